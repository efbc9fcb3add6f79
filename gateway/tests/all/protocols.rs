//! Protocols: TLS with SNI, HTTP/2 over TLS (ALPN) and h2c, upstream HTTP/2 and TLS, gRPC
//! streaming with trailers, WebSocket upgrades.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_alpn_picks_the_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let (a_cert, a_key, a_pem) = cert_files(dir.path(), "a", &["a.example.com"]);
    let (w_cert, w_key, w_pem) = cert_files(dir.path(), "w", &["*.shop.example.com"]);
    let (d_cert, d_key, d_pem) = cert_files(dir.path(), "d", &["default.example.com"]);
    let up = upstream("up", Behavior::default()).await;
    let cfg = format!(
        "{}  - name: tls
    address: 127.0.0.1:0
    tls:
      certificates:
        - {{ cert: \"{d_cert}\", key: \"{d_key}\" }}
        - {{ cert: \"{a_cert}\", key: \"{a_key}\" }}
        - {{ cert: \"{w_cert}\", key: \"{w_key}\" }}
routes:
  - {{ name: r, backends: [ {{ cluster: up }} ] }}
clusters:
  - {{ name: up, endpoints: [ {{ address: \"{}\" }} ] }}
",
        base(),
        up.addr
    );
    let gw = gateway(&cfg).await;
    let addr = gw.addr("tls").await;
    let all_cas = format!("{a_pem}{w_pem}{d_pem}");

    let (s, cert) = tls_connect(addr, "a.example.com", &all_cas, &[b"h2", b"http/1.1"]).await;
    assert_eq!(cert, pem_to_der(&a_pem));
    let r = request_over(
        s,
        true,
        Request::get("https://a.example.com/x")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-test-version"], "HTTP/2.0");
    assert_eq!(r.json()["headers"]["x-forwarded-proto"], "https");
    assert_eq!(r.json()["headers"]["host"], "a.example.com");

    let (s, cert) = tls_connect(addr, "cart.shop.example.com", &all_cas, &[b"http/1.1"]).await;
    assert_eq!(cert, pem_to_der(&w_pem), "wildcard certificate");
    let r = request_over(
        s,
        false,
        Request::get("/")
            .header("host", "cart.shop.example.com")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-test-version"], "HTTP/1.1");

    let (_, cert) = tls_connect(addr, "default.example.com", &all_cas, &[]).await;
    assert_eq!(cert, pem_to_der(&d_pem));
    // An unknown name gets the default (first) certificate; our client then rejects it by name,
    // so check with the resolver's choice through a name the default covers only.
    let (_, cert) = tls_connect(addr, "default.example.com", &d_pem, &[b"h2"]).await;
    assert_eq!(cert, pem_to_der(&d_pem));

    // Certificates are re-read on reload.
    let (n_cert, n_key, n_pem) = cert_files(dir.path(), "a2", &["a.example.com"]);
    gw.reload(&cfg.replace(&a_cert, &n_cert).replace(&a_key, &n_key))
        .await
        .unwrap();
    let (_, cert) = tls_connect(
        addr,
        "a.example.com",
        &format!("{n_pem}{all_cas}"),
        &[b"h2"],
    )
    .await;
    assert_eq!(cert, pem_to_der(&n_pem));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_downstream_and_h2_upstream() {
    let up = upstream("up", Behavior::default()).await;
    let cfg = format!(
        "{}routes:
  - {{ name: h1, match: {{ path: {{ prefix: /h1 }} }}, backends: [ {{ cluster: h1 }} ] }}
  - {{ name: h2, match: {{ path: {{ prefix: /h2 }} }}, backends: [ {{ cluster: h2 }} ] }}
clusters:
  - {{ name: h1, endpoints: [ {{ address: \"{a}\" }} ] }}
  - {{ name: h2, protocol: http2, endpoints: [ {{ address: \"{a}\" }} ] }}
",
        base(),
        a = up.addr
    );
    let gw = gateway(&cfg).await;
    let addr = gw.addr("main").await;
    let c = h2c_client();
    let r = send(
        &c,
        Request::get(format!("http://{addr}/h1"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["version"],
        "HTTP/1.1",
        "HTTP/2 downstream, HTTP/1.1 upstream"
    );
    let r = send(
        &c,
        Request::get(format!("http://{addr}/h2"))
            .header("x-a", "1")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.json()["version"], "HTTP/2.0");
    assert_eq!(
        r.json()["uri"],
        format!("http://{addr}/h2"),
        ":authority is the client's"
    );
    let r = get(addr, "svc.local", "/h2", &[]).await;
    assert_eq!(
        r.json()["version"],
        "HTTP/2.0",
        "HTTP/1.1 downstream, HTTP/2 upstream"
    );
    assert_eq!(r.json()["uri"], "http://svc.local/h2");
    let h2_connections = || async {
        let clusters = admin_get(gw.admin(), "/clusters").await.json();
        clusters["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "h2")
            .unwrap()["connections"]
            .as_u64()
            .unwrap()
    };
    // Each worker keeps one connection per endpoint, as Envoy's do; the two downstream
    // connections so far may have landed on different workers.
    let before = h2_connections().await;
    let workers = gw.gateway.shared().workers.count() as u64;
    assert!((1..=workers).contains(&before), "{before} connections");
    // Many concurrent streams on the h2c connection (one worker, which already has its
    // upstream connection) share that connection.
    let mut tasks = Vec::new();
    for i in 0..50 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            send(
                &c,
                Request::get(format!("http://{addr}/h2/{i}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(h2_connections().await, before, "no new upstream connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_with_sni_and_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, pem) = cert_files(dir.path(), "up", &["backend.internal"]);
    // A TLS upstream: another gateway listener with a direct response stands in for it.
    let up_cfg = format!(
        "admin: {{ address: \"\" }}\nserver: {{ watch: false }}\nlisteners:\n  - {{ name: tls, address: 127.0.0.1:0, tls: {{ certificates: [ {{ cert: \"{cert}\", key: \"{key}\" }} ] }} }}\nroutes:\n  - {{ name: r, direct_response: {{ status: 200, body: secure }} }}\n"
    );
    let up = gateway(&up_cfg).await;
    let up_addr = up.addr("tls").await;
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pem).unwrap();
    let cfg = format!(
        "{}routes:
  - {{ name: h2, match: {{ path: {{ prefix: /h2 }} }}, backends: [ {{ cluster: secure2 }} ] }}
  - {{ name: r, backends: [ {{ cluster: secure }} ] }}
clusters:
  - {{ name: secure, endpoints: [ {{ address: \"{up_addr}\" }} ], tls: {{ sni: backend.internal, ca: \"{}\" }} }}
  - {{ name: secure2, protocol: http2, endpoints: [ {{ address: \"{up_addr}\" }} ], tls: {{ sni: backend.internal, ca: \"{}\" }} }}
",
        base(),
        ca.display(),
        ca.display()
    );
    let gw = gateway(&cfg).await;
    let addr = gw.addr("main").await;
    let r = get(addr, "x", "/", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, "secure");
    let r = get(addr, "x", "/h2", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // A wrong SNI fails verification: 503 with a TLS reason.
    let bad = cfg.replace("sni: backend.internal, ca", "sni: other.internal, ca");
    gw.reload(&bad).await.unwrap();
    let r = get(addr, "x", "/", &[]).await;
    assert_eq!(r.status, 503);
    assert!(r.body.contains("connection failure"), "{}", r.body);
}
