//! The generator against the benchmark upstream on 127.0.0.1, port 0.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use weir_loadtest::generator::{self, LoadConfig, Mode, Protocol, Target};
use weir_loadtest::tls::{TestPki, client_config};
use weir_loadtest::upstream::{self, UpstreamConfig};

async fn upstream() -> (SocketAddr, std::sync::Arc<upstream::Upstream>) {
    upstream::spawn(
        "127.0.0.1:0".parse().unwrap(),
        UpstreamConfig::default(),
        None,
    )
    .await
    .unwrap()
}

fn short(addr: SocketAddr, path: &str) -> LoadConfig {
    let mut cfg = LoadConfig::new(addr, path);
    cfg.connections = 4;
    cfg.warmup = Duration::from_millis(100);
    cfg.duration = Duration::from_millis(500);
    cfg.timeout = Duration::from_secs(2);
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_http1_counts_every_response() {
    let (addr, up) = upstream().await;
    let r = generator::run(short(addr, "/size/1024")).await.unwrap();
    assert!(r.ok > 100, "{r:?}");
    assert_eq!((r.errors, r.non_2xx), (0, 0), "{r:?}");
    assert_eq!(r.body_bytes, r.ok * 1024);
    assert!(r.throughput_rps > 0.0 && (r.throughput_rps - r.ok as f64 / 0.5).abs() < 1e-6);
    assert_eq!(r.latency.count, r.ok);
    assert!(
        r.latency.p50_us > 0.0
            && r.latency.p50_us <= r.latency.p99_us
            && r.latency.p99_us <= r.latency.max_us
    );
    // Warm-up and requests cut off at the end are sent but not counted.
    assert!(
        up.requests() > r.ok,
        "{} served, {} counted",
        up.requests(),
        r.ok
    );
    assert_eq!(r.mode, "closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_h2c_with_streams() {
    let (addr, _) = upstream().await;
    let mut cfg = short(addr, "/size/100");
    cfg.protocol = Protocol::H2c;
    cfg.connections = 2;
    cfg.streams = 8;
    let r = generator::run(cfg).await.unwrap();
    assert!(r.ok > 100, "{r:?}");
    assert_eq!((r.errors, r.non_2xx), (0, 0), "{r:?}");
    assert_eq!(r.body_bytes, r.ok * 100);
    assert_eq!(r.protocol, "h2c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_sends_the_scheduled_count() {
    let (addr, up) = upstream().await;
    let mut cfg = short(addr, "/");
    cfg.mode = Mode::Open { rate: 2_000.0 };
    cfg.warmup = Duration::from_millis(200);
    cfg.duration = Duration::from_secs(1);
    let t0 = Instant::now();
    let r = generator::run(cfg).await.unwrap();
    // 2,000/s over 1.2 s is 2,400 requests, 2,000 of them in the measured window.
    assert_eq!(up.requests(), 2_400);
    assert_eq!(r.ok, 2_000, "{r:?}");
    assert_eq!(r.rate, Some(2_000.0));
    assert!(
        t0.elapsed() >= Duration::from_millis(1_150),
        "the schedule paces the requests"
    );
    assert!(
        (r.throughput_rps - 2_000.0).abs() < 20.0,
        "{}",
        r.throughput_rps
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_latency_includes_the_wait_for_a_busy_connection() {
    // One connection, a rate it can follow easily: latencies stay small. Then a server that
    // stalls every request for 20 ms with a schedule of 1 ms: requests queue behind each other,
    // and latency measured from the intended time grows far beyond the 20 ms service time.
    let (addr, _) = upstream().await;
    let mut cfg = short(addr, "/");
    cfg.connections = 1;
    cfg.mode = Mode::Open { rate: 200.0 };
    let r = generator::run(cfg).await.unwrap();
    assert!(r.latency.p99_us < 20_000.0, "{:?}", r.latency);

    let slow = slow_server(Duration::from_millis(20)).await;
    let mut cfg = short(slow, "/");
    cfg.connections = 1;
    cfg.warmup = Duration::ZERO;
    cfg.duration = Duration::from_millis(200);
    cfg.mode = Mode::Open { rate: 1_000.0 };
    cfg.timeout = Duration::from_secs(30);
    let r = generator::run(cfg).await.unwrap();
    assert_eq!(r.ok, 200);
    // The last request is due at 199 ms but served at about 200 × 20 ms = 4 s.
    assert!(r.latency.max_us > 3_000_000.0, "{:?}", r.latency);
    assert!(r.latency.p50_us > 1_000_000.0, "{:?}", r.latency);
    // The rate served is the server's (one request per 20 ms), not the rate offered.
    assert!(r.throughput_rps < 60.0, "{}", r.throughput_rps);
}

/// An HTTP/1.1 server that waits `delay` before every response.
async fn slow_server(delay: Duration) -> SocketAddr {
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(move |_req| async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_2xx_and_errors_are_counted_apart() {
    let (addr, _) = upstream().await;
    let r = generator::run(short(addr, "/size/not-a-number"))
        .await
        .unwrap();
    assert_eq!(r.ok, 0);
    assert!(r.non_2xx > 100, "{r:?}");
    assert_eq!(r.errors, 0);
    assert_eq!(r.latency.count, 0, "only 2xx responses enter the histogram");

    // Nothing listens on a port just released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cfg = short(closed, "/");
    cfg.connections = 2;
    let r = generator::run(cfg.clone()).await.unwrap();
    assert_eq!(r.ok, 0);
    assert!(r.errors > 0, "{r:?}");

    // An open loop against a dead server ends on time and counts every scheduled request.
    cfg.mode = Mode::Open { rate: 1_000.0 };
    let r = generator::run(cfg).await.unwrap();
    assert_eq!(r.ok, 0);
    assert_eq!(
        r.errors, 500,
        "each of the 500 requests of the window, once: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_rotate() {
    let (addr, _) = upstream().await;
    let mut cfg = short(addr, "/");
    cfg.connections = 1;
    cfg.targets = vec![
        Target {
            host: "a.example.com".into(),
            path: "/size/1".into(),
        },
        Target {
            host: "b.example.com".into(),
            path: "/size/3".into(),
        },
    ];
    cfg.mode = Mode::Open { rate: 1_000.0 };
    cfg.warmup = Duration::ZERO;
    let r = generator::run(cfg).await.unwrap();
    assert_eq!(r.ok, 500);
    assert_eq!(
        r.body_bytes,
        250 + 250 * 3,
        "250 bodies of 1 byte and 250 of 3"
    );
}

async fn tls_upstream() -> (SocketAddr, std::sync::Arc<rustls::ClientConfig>) {
    let pki = TestPki::generate().unwrap();
    let acceptor = upstream::tls_acceptor(&pki.cert_pem, &pki.key_pem).unwrap();
    let (addr, _) = upstream::spawn(
        "127.0.0.1:0".parse().unwrap(),
        UpstreamConfig::default(),
        Some(acceptor),
    )
    .await
    .unwrap();
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let ca = CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap();
    (addr, client_config(vec![ca], &[]).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_keep_alive_h1_and_h2_and_handshake_per_request() {
    let (addr, tls) = tls_upstream().await;
    for (protocol, streams, per_request) in [
        (Protocol::H1Tls, 1, false),
        (Protocol::H2Tls, 4, false),
        (Protocol::H1Tls, 1, true),
    ] {
        let mut cfg = short(addr, "/size/10");
        cfg.protocol = protocol;
        cfg.streams = streams;
        cfg.new_connection_per_request = per_request;
        cfg.tls = Some(tls.clone());
        let r = generator::run(cfg).await.unwrap();
        assert!(r.ok > 20, "{protocol:?} {per_request}: {r:?}");
        assert_eq!(
            (r.errors, r.non_2xx),
            (0, 0),
            "{protocol:?} {per_request}: {r:?}"
        );
        assert_eq!(r.new_connection_per_request, per_request);
    }
    // A server name the certificate does not cover fails every handshake.
    let mut cfg = short(addr, "/");
    cfg.protocol = Protocol::H1Tls;
    cfg.tls = Some(tls);
    cfg.server_name = "wrong.invalid".into();
    let r = generator::run(cfg).await.unwrap();
    assert_eq!(r.ok, 0);
    assert!(r.errors > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_held_open() {
    let (addr, up) = upstream().await;
    let cfg = short(addr, "/");
    let mut ready_seen = None;
    let r = generator::hold_idle(&cfg, 300, Duration::from_millis(200), |r| {
        ready_seen = Some(r.open)
    })
    .await
    .unwrap();
    assert_eq!(ready_seen, Some(300));
    assert_eq!(
        (r.requested, r.open, r.failed, r.still_open),
        (300, 300, 0, 300)
    );
    assert_eq!(up.requests(), 300);
}
