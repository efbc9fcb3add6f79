//! Upstreams: load balancers, retries and timeouts, outlier ejection, health checks, circuit
//! breakers and connect failures.

use std::time::Duration;

use crate::support::*;

fn eps(addrs: &[std::net::SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| format!("{{ address: \"{a}\" }}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancers_spread_as_designed() {
    let ups = [
        upstream("u0", Behavior::default()).await,
        upstream("u1", Behavior::default()).await,
        upstream("u2", Behavior::default()).await,
    ];
    let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let cfg = format!(
        "{}routes:
  - {{ name: rr, match: {{ path: {{ prefix: /rr }} }}, backends: [ {{ cluster: rr }} ] }}
  - {{ name: random, match: {{ path: {{ prefix: /random }} }}, backends: [ {{ cluster: random }} ] }}
  - {{ name: lr, match: {{ path: {{ prefix: /lr }} }}, backends: [ {{ cluster: lr }} ] }}
  - {{ name: hash, match: {{ path: {{ prefix: /hash }} }}, backends: [ {{ cluster: hash }} ] }}
  - {{ name: cookie, match: {{ path: {{ prefix: /cookie }} }}, backends: [ {{ cluster: cookie }} ] }}
clusters:
  - {{ name: rr, endpoints: [ {e} ] }}
  - {{ name: random, endpoints: [ {e} ], load_balancing: {{ policy: random }} }}
  - {{ name: lr, endpoints: [ {e} ], load_balancing: {{ policy: least_request }} }}
  - {{ name: hash, endpoints: [ {e} ], load_balancing: {{ policy: ring_hash, hash_on: \"header:x-user\" }} }}
  - {{ name: cookie, endpoints: [ {e} ], load_balancing: {{ policy: ring_hash, hash_on: \"cookie:session\" }} }}
",
        base(),
        e = eps(&addrs)
    );
    let gw = gateway(&cfg).await;
    let addr = gw.addr("main").await;

    let rr = spread(addr, "x", "/rr", 30).await;
    assert!(
        rr.values().all(|&n| n == 10),
        "round robin is exact: {rr:?}"
    );
    let random = spread(addr, "x", "/random", 300).await;
    assert_eq!(random.len(), 3, "{random:?}");
    assert!(random.values().all(|&n| n > 50), "{random:?}");
    let lr = spread(addr, "x", "/lr", 300).await;
    assert_eq!(lr.len(), 3, "{lr:?}");

    // Ring hash: the same key always lands on the same endpoint; keys spread.
    let mut owners = std::collections::HashSet::new();
    for user in 0..30 {
        let key = format!("user-{user}");
        let first = get(addr, "x", "/hash", &[("x-user", &key)])
            .await
            .upstream();
        for _ in 0..3 {
            assert_eq!(
                get(addr, "x", "/hash", &[("x-user", &key)])
                    .await
                    .upstream(),
                first
            );
        }
        owners.insert(first);
    }
    assert!(owners.len() >= 2, "30 keys all on one endpoint: {owners:?}");
    let c = "session=abc; other=1".to_string();
    let first = get(addr, "x", "/cookie", &[("cookie", &c)])
        .await
        .upstream();
    for _ in 0..5 {
        assert_eq!(
            get(addr, "x", "/cookie", &[("cookie", &c)])
                .await
                .upstream(),
            first
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_on_5xx_and_per_try_timeout() {
    let flaky = upstream(
        "flaky",
        Behavior {
            fail_first: 1,
            ..Default::default()
        },
    )
    .await;
    let slow = upstream(
        "slow",
        Behavior {
            slow_first: 1,
            delay: Duration::from_secs(3),
            ..Default::default()
        },
    )
    .await;
    let broken = upstream(
        "broken",
        Behavior {
            status: Some(503),
            ..Default::default()
        },
    )
    .await;
    let cfg = format!(
        "{}routes:
  - name: flaky
    match: {{ path: {{ prefix: /flaky }} }}
    backends: [ {{ cluster: flaky }} ]
    retries: {{ attempts: 2, on: [5xx], backoff_base: 1ms }}
  - name: slow
    match: {{ path: {{ prefix: /slow }} }}
    backends: [ {{ cluster: slow }} ]
    retries: {{ attempts: 1, on: [reset], per_try_timeout: 200ms, backoff_base: 1ms }}
  - name: broken
    match: {{ path: {{ prefix: /broken }} }}
    backends: [ {{ cluster: broken }} ]
    retries: {{ attempts: 2, on: [gateway-error], backoff_base: 1ms }}
  - name: no-retry-post
    match: {{ path: {{ prefix: /post }} }}
    backends: [ {{ cluster: flaky }} ]
  - name: timeout
    match: {{ path: {{ prefix: /timeout }} }}
    timeout: 150ms
    backends: [ {{ cluster: slow }} ]
clusters:
  - {{ name: flaky, endpoints: [ {{ address: \"{}\" }} ] }}
  - {{ name: slow, endpoints: [ {{ address: \"{}\" }} ] }}
  - {{ name: broken, endpoints: [ {{ address: \"{}\" }} ] }}
",
        base(),
        flaky.addr,
        slow.addr,
        broken.addr
    );
    let gw = gateway(&cfg).await;
    let addr = gw.addr("main").await;

    let r = get(addr, "x", "/flaky", &[]).await;
    assert_eq!(r.status, 200, "the retry succeeds");
    assert_eq!(flaky.hits(), 2);

    let r = get(addr, "x", "/slow", &[]).await;
    assert_eq!(
        r.status, 200,
        "the first attempt times out after 200ms, the retry answers"
    );
    assert_eq!(slow.hits(), 2);

    let r = get(addr, "x", "/broken", &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(broken.hits(), 3, "first attempt plus two retries");

    let m = admin_get(gw.admin(), "/metrics").await.body;
    assert!(
        m.contains("weir_cluster_retries_total{cluster=\"broken\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("weir_cluster_timeouts_total{cluster=\"slow\"} 1"),
        "{m}"
    );

    // A route timeout answers 504.
    let slow2 = upstream(
        "slow2",
        Behavior {
            slow_first: 100,
            delay: Duration::from_secs(2),
            ..Default::default()
        },
    )
    .await;
    gw.reload(&cfg.replace(&slow.addr.to_string(), &slow2.addr.to_string()))
        .await
        .unwrap();
    let r = get(addr, "x", "/timeout", &[]).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.body, "upstream request timeout\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_is_503_uf_and_retried_on_another_endpoint() {
    // A port with nothing listening.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let live = upstream("live", Behavior::default()).await;
    let cfg = format!(
        "{}routes:
  - {{ name: dead, match: {{ path: {{ prefix: /dead }} }}, backends: [ {{ cluster: dead }} ] }}
  - name: mixed
    match: {{ path: {{ prefix: /mixed }} }}
    backends: [ {{ cluster: mixed }} ]
    retries: {{ attempts: 1, on: [connect-failure], backoff_base: 1ms }}
clusters:
  - {{ name: dead, endpoints: [ {{ address: \"{dead}\" }} ] }}
  - {{ name: mixed, endpoints: [ {{ address: \"{dead}\" }}, {{ address: \"{}\" }} ] }}
",
        base(),
        live.addr
    );
    let gw = gateway(&cfg).await;
    let addr = gw.addr("main").await;
    let r = get(addr, "x", "/dead", &[]).await;
    assert_eq!(r.status, 503);
    assert!(r.body.contains("connection failure"), "{}", r.body);
    for _ in 0..10 {
        assert_eq!(
            get(addr, "x", "/mixed", &[]).await.status,
            200,
            "retried on the live endpoint"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_a_failing_endpoint() {
    let bad = upstream(
        "bad",
        Behavior {
            status: Some(500),
            ..Default::default()
        },
    )
    .await;
    let good = upstream("good", Behavior::default()).await;
    let cfg = format!(
        "{}routes:
  - {{ name: r, backends: [ {{ cluster: c }} ] }}
clusters:
  - name: c
    endpoints: [ {} ]
    outlier_detection: {{ consecutive_5xx: 3, base_ejection_time: 30s, max_ejection_percent: 50 }}
",
        base(),
        eps(&[bad.addr, good.addr])
    );
    let gw = gateway(&cfg).await;
    let addr = gw.addr("main").await;
    for _ in 0..6 {
        get(addr, "x", "/", &[]).await;
    }
    assert_eq!(bad.hits(), 3, "ejected after 3 consecutive 5xx");
    let before = bad.hits();
    let counts = spread(addr, "x", "/", 20).await;
    assert_eq!(counts.get("good"), Some(&20));
    assert_eq!(bad.hits(), before);
    let clusters = admin_get(gw.admin(), "/clusters").await.json();
    let eps = clusters["clusters"][0]["endpoints"]
        .as_array()
        .unwrap()
        .clone();
    let bad_ep = eps
        .iter()
        .find(|e| e["address"] == bad.addr.to_string())
        .unwrap();
    assert_eq!(bad_ep["ejected"], true);
    let m = admin_get(gw.admin(), "/metrics").await.body;
    assert!(
        m.contains("weir_cluster_ejections_total{cluster=\"c\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("weir_cluster_endpoints{cluster=\"c\",state=\"ejected\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_take_unhealthy_endpoints_out() {
    let sick = upstream(
        "sick",
        Behavior {
            status: Some(503),
            ..Default::default()
        },
    )
    .await;
    let well = upstream("well", Behavior::default()).await;
    let cfg = format!(
        "{}routes:
  - {{ name: r, backends: [ {{ cluster: c }} ] }}
clusters:
  - name: c
    endpoints: [ {} ]
    health_check: {{ path: /healthz, interval: 50ms, timeout: 1s, unhealthy_threshold: 2 }}
",
        base(),
        eps(&[sick.addr, well.addr])
    );
    let gw = gateway(&cfg).await;
    let addr = gw.addr("main").await;
    let mut healthy = true;
    for _ in 0..100 {
        let c = admin_get(gw.admin(), "/clusters").await.json();
        let eps = c["clusters"][0]["endpoints"].as_array().unwrap().clone();
        healthy = eps
            .iter()
            .find(|e| e["address"] == sick.addr.to_string())
            .unwrap()["healthy"]
            .as_bool()
            .unwrap();
        if !healthy {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!healthy, "the failing endpoint is marked unhealthy");
    let counts = spread(addr, "x", "/", 20).await;
    assert_eq!(counts.get("well"), Some(&20), "{counts:?}");
}

/// A gateway in front of an upstream that answers after 500 ms, with `circuit_breakers`;
/// returns it with the statuses of `n` concurrent requests, sorted.
async fn behind_circuit_breaker(circuit_breakers: &str, n: usize) -> (TestGateway, Vec<u16>) {
    let slow = upstream(
        "slow",
        Behavior {
            slow_first: 1000,
            delay: Duration::from_millis(500),
            ..Default::default()
        },
    )
    .await;
    let cfg = format!(
        "{}routes:\n  - {{ name: r, backends: [ {{ cluster: c }} ] }}\nclusters:\n  - name: c\n    endpoints: [ {{ address: \"{}\" }} ]\n    circuit_breakers: {circuit_breakers}\n",
        base(),
        slow.addr
    );
    let gw = gateway(&cfg).await;
    let addr = gw.addr("main").await;
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(async move { get(addr, "x", "/", &[]).await.status }))
        .collect();
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    codes.sort();
    (gw, codes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_answers_503_uo() {
    let (gw, codes) = behind_circuit_breaker("{ max_requests: 2 }", 6).await;
    assert_eq!(codes.iter().filter(|&&c| c == 200).count(), 2, "{codes:?}");
    assert_eq!(codes.iter().filter(|&&c| c == 503).count(), 4, "{codes:?}");
    let m = admin_get(gw.admin(), "/metrics").await.body;
    assert!(
        m.contains("weir_cluster_overflow_total{cluster=\"c\"} 4"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_endpoints_are_resolved() {
    let up = upstream("dns", Behavior::default()).await;
    let cfg = format!(
        "{}routes:
  - {{ name: r, backends: [ {{ cluster: c }} ] }}
clusters:
  - {{ name: c, endpoints: [ {{ address: \"localhost:{}\" }} ], dns_refresh: 200ms }}
",
        base(),
        up.addr.port()
    );
    let gw = gateway(&cfg).await;
    let addr = gw.addr("main").await;
    // localhost may resolve to ::1 too, where nothing listens: ask enough times for 200s.
    let mut ok = 0;
    for _ in 0..10 {
        if get(addr, "x", "/", &[]).await.status == 200 {
            ok += 1;
        }
    }
    assert!(ok >= 1, "localhost resolved to the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_answers_429_with_retry_after() {
    let cfg = format!(
        "{}routes:
  - name: r
    rate_limit: {{ requests: 3, per: 1m, key: \"header:x-api-key\" }}
    direct_response: {{ status: 200, body: ok }}
",
        base()
    );
    let gw = gateway(&cfg).await;
    let addr = gw.addr("main").await;
    for _ in 0..3 {
        assert_eq!(
            get(addr, "x", "/", &[("x-api-key", "k1")]).await.status,
            200
        );
    }
    let r = get(addr, "x", "/", &[("x-api-key", "k1")]).await;
    assert_eq!(r.status, 429);
    let after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&after), "{after}");
    assert_eq!(
        get(addr, "x", "/", &[("x-api-key", "k2")]).await.status,
        200,
        "another key has its own bucket"
    );
    // An unrelated reload keeps the buckets.
    gw.reload(&format!("{cfg}  - {{ name: other, match: {{ path: {{ prefix: /o }} }}, direct_response: {{ status: 204 }} }}\n"))
        .await
        .unwrap();
    assert_eq!(
        get(addr, "x", "/", &[("x-api-key", "k1")]).await.status,
        429
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_to_a_cluster_answers_503_uo() {
    let (gw, codes) = behind_circuit_breaker("{ max_connections: 1 }", 3).await;
    assert!(codes.contains(&200), "{codes:?}");
    assert!(
        codes.contains(&503),
        "a second connection is refused: {codes:?}"
    );
    let clusters = admin_get(gw.admin(), "/clusters").await.json();
    assert!(clusters["clusters"][0]["connections"].as_u64().unwrap() <= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_before_the_response_is_retried_with_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An upstream that closes its first connection after reading the request, then answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                if n > 0 {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                }
            });
        }
    });
    let cfg = format!(
        "{}routes:\n  - name: r\n    backends: [ {{ cluster: c }} ]\n    retries: {{ attempts: 1, on: [reset], backoff_base: 1ms }}\nclusters:\n  - {{ name: c, endpoints: [ {{ address: \"{addr}\" }} ] }}\n",
        base()
    );
    let gw = gateway(&cfg).await;
    let r = get(gw.addr("main").await, "x", "/", &[]).await;
    assert_eq!(r.status, 200, "the reset attempt was retried: {}", r.body);
    assert_eq!(r.body, "ok");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_abort_uploads_do_not_eject_the_endpoint() {
    use tokio::io::AsyncWriteExt;
    let up = upstream("up", Behavior::default()).await;
    let cfg = format!(
        "{}routes:
  - {{ name: r, backends: [ {{ cluster: c }} ], retries: {{ attempts: 2, on: [reset, 5xx] }} }}
clusters:
  - name: c
    endpoints: [ {} ]
    outlier_detection: {{ consecutive_5xx: 2, base_ejection_time: 30s, max_ejection_percent: 100 }}
",
        base(),
        eps(&[up.addr])
    );
    let gw = gateway(&cfg).await;
    let addr = gw.addr("main").await;
    // Each client announces 1,000 bytes, sends 5 and goes away: the upstream, which has the
    // headers, sees the request cut, through no fault of its own.
    for _ in 0..4 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\nhello")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(s);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let clusters = admin_get(gw.admin(), "/clusters").await.json();
    assert_eq!(
        clusters["clusters"][0]["endpoints"][0]["ejected"], false,
        "{clusters}"
    );
    assert_eq!(get(addr, "x", "/", &[]).await.status, 200);
    let m = admin_get(gw.admin(), "/metrics").await.body;
    assert!(
        m.contains("weir_cluster_ejections_total{cluster=\"c\"} 0"),
        "{m}"
    );
    assert!(
        m.contains("weir_cluster_retries_total{cluster=\"c\"} 0"),
        "a cut upload is not retried: {m}"
    );
}
