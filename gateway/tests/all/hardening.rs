//! Hardening: strict request parsing, header limits, connection limits, the PROXY protocol and
//! HTTP/2 reset floods.

use std::time::Duration;

use crate::support::*;

fn cfg_with(limits: &str, extra_listener: &str) -> String {
    format!(
        "admin: {{ address: 127.0.0.1:0 }}\nserver: {{ watch: false }}\nlisteners:\n  - {{ name: main, address: 127.0.0.1:0{limits} }}\n{extra_listener}routes:\n  - {{ name: r, backends: [ {{ cluster: up }} ] }}\nclusters:\n  - {{ name: up, endpoints: [ {{ address: \"UP\" }} ] }}\n"
    )
}

async fn start(limits: &str, extra: &str) -> (TestGateway, Upstream) {
    let up = upstream("up", Behavior::default()).await;
    let gw = gateway(&cfg_with(limits, extra).replace("UP", &up.addr.to_string())).await;
    (gw, up)
}

fn status_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_close() {
    let (gw, up) = start("", "").await;
    let addr = gw.addr("main").await;
    let wait = Duration::from_secs(3);
    let cases: &[(&str, &[u8])] = &[
        ("missing host", b"GET / HTTP/1.1\r\n\r\n"),
        (
            "duplicate host",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ),
        (
            "underscore in name",
            b"GET / HTTP/1.1\r\nHost: a\r\nx_user: 1\r\n\r\n",
        ),
        (
            "invalid byte in name",
            b"GET / HTTP/1.1\r\nHost: a\r\nX(y: z\r\n\r\n",
        ),
        (
            "invalid byte in value",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n",
        ),
        (
            "differing content-lengths",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
        ),
        (
            "content-length list",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\nx",
        ),
        (
            "signed content-length",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\nx",
        ),
        (
            "transfer-encoding not chunked",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        ),
        (
            "chunked not final",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        ),
        (
            "obsolete line folding",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n c\r\n\r\n",
        ),
        ("bare CR", b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n"),
        // Request smuggling vectors hyper alone accepts; the listener's framing guard rejects them.
        ("content-length with transfer-encoding", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("transfer-encoding list", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
        ("duplicate identical content-length", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx"),
        ("bare LF request line", b"GET / HTTP/1.1\nHost: a\r\n\r\n"),
        ("bare LF header", b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n"),
    ];
    for (name, bytes) in cases {
        let out = raw(addr, bytes, wait).await;
        assert!(
            status_line(&out).starts_with("HTTP/1.1 400"),
            "{name}: {out:?}"
        );
        assert!(
            out.to_ascii_lowercase().contains("connection: close"),
            "{name}: 400 and close: {out:?}"
        );
    }
    assert_eq!(up.hits(), 0, "nothing malformed reached the upstream");
    // A good request, then a smuggling attempt on the same keep-alive connection.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    s.write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 400"), "{rest}");
    assert_eq!(
        rest.matches("HTTP/1.1").count(),
        1,
        "nothing after the 400: {rest}"
    );
    assert_eq!(
        up.hits(),
        1,
        "the smuggled request never reached the upstream"
    );
    let m = admin_get(gw.admin(), "/metrics").await.body;
    let errors: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("weir_downstream_protocol_errors_total "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(
        errors >= 6,
        "guard and request checks are counted: {errors}"
    );
    // The underscore rule is configurable.
    let (gw2, up2) = start(", limits: { allow_underscores_in_headers: true }", "").await;
    let out = raw(
        gw2.addr("main").await,
        b"GET / HTTP/1.1\r\nHost: a\r\nx_user: 1\r\nConnection: close\r\n\r\n",
        wait,
    )
    .await;
    assert!(status_line(&out).starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(up2.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_limits() {
    let (gw, up) = start(
        ", limits: { max_request_headers: 10, max_request_headers_bytes: 16384 }",
        "",
    )
    .await;
    let addr = gw.addr("main").await;
    let many: String = (0..20).map(|i| format!("x-h{i}: v\r\n")).collect();
    let out = raw(
        addr,
        format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n").as_bytes(),
        Duration::from_secs(3),
    )
    .await;
    assert!(
        status_line(&out).starts_with("HTTP/1.1 431"),
        "too many headers: {out:?}"
    );
    let big = "v".repeat(20_000);
    let out = raw(
        addr,
        format!("GET / HTTP/1.1\r\nHost: a\r\nx-big: {big}\r\n\r\n").as_bytes(),
        Duration::from_secs(3),
    )
    .await;
    assert!(
        status_line(&out).starts_with("HTTP/1.1 431"),
        "headers too large: {out:?}"
    );
    let out = raw(
        addr,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(status_line(&out).starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_per_listener() {
    let (gw, _up) = start(", limits: { max_connections: 2 }", "").await;
    let addr = gw.addr("main").await;
    let _a = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _b = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let out = raw(
        addr,
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(out, "", "the third connection is closed without an answer");
    let m = admin_get(gw.admin(), "/metrics").await.body;
    assert!(
        m.contains("weir_downstream_connections_overflow_total 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_sets_the_client_address() {
    let (gw, _up) = start(", proxy_protocol: true", "").await;
    let addr = gw.addr("main").await;
    let out = raw(
        addr,
        b"PROXY TCP4 203.0.113.7 198.51.100.1 40000 80\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let body = out.split("\r\n\r\n").nth(1).unwrap();
    let j: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(j["headers"]["x-forwarded-for"], "203.0.113.7");
    // v2 binary header.
    let mut v2 = vec![
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x11, 0, 12,
    ];
    v2.extend_from_slice(&[192, 0, 2, 44, 127, 0, 0, 1, 0x30, 0x39, 0x00, 0x50]);
    v2.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    let out = raw(addr, &v2, Duration::from_secs(3)).await;
    assert!(out.contains("\"x-forwarded-for\":\"192.0.2.44\""), "{out}");
    // Without the header the connection is refused.
    let out = raw(
        addr,
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(out, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_flood_is_cut_off() {
    let (gw, _up) = start("", "").await;
    let addr = gw.addr("main").await;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn_task = tokio::spawn(conn);
    let mut client = client;
    let mut refused = false;
    // CVE-2023-44487: open streams and reset them at once, many times.
    for _ in 0..5000 {
        let ready = match tokio::time::timeout(Duration::from_secs(2), client.ready()).await {
            Ok(Ok(c)) => c,
            _ => {
                refused = true;
                break;
            }
        };
        client = ready;
        let req = http::Request::get(format!("http://{addr}/"))
            .body(())
            .unwrap();
        match client.send_request(req, true) {
            Ok((resp, _)) => drop(resp),
            Err(_) => {
                refused = true;
                break;
            }
        }
        // Dropping the response future with the stream open resets it (RST_STREAM CANCEL).
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), conn_task).await;
    assert!(
        refused || matches!(ended, Ok(Ok(Err(_))) | Ok(Ok(Ok(())))),
        "the flood must end the connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_max_concurrent_streams_is_advertised_and_enforced() {
    let slow = upstream(
        "slow",
        Behavior {
            slow_first: 1000,
            delay: Duration::from_millis(400),
            ..Default::default()
        },
    )
    .await;
    let gw = gateway(
        &cfg_with(", limits: { max_concurrent_streams: 3 }", "")
            .replace("UP", &slow.addr.to_string()),
    )
    .await;
    let addr = gw.addr("main").await;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let (first, _) = client
        .send_request(
            http::Request::get(format!("http://{addr}/"))
                .body(())
                .unwrap(),
            true,
        )
        .unwrap();
    assert_eq!(first.await.unwrap().status(), 200);
    // The client has the limit from the server's SETTINGS and queues beyond it.
    assert_eq!(client.current_max_send_streams(), 3);
    let mut pending = Vec::new();
    for _ in 0..6 {
        client = client.ready().await.unwrap();
        let (resp, _) = client
            .send_request(
                http::Request::get(format!("http://{addr}/"))
                    .body(())
                    .unwrap(),
                true,
            )
            .unwrap();
        pending.push(resp);
    }
    for resp in pending {
        assert_eq!(resp.await.unwrap().status(), 200);
    }
    assert_eq!(slow.hits(), 7);
}
