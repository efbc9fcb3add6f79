//! Hot reload under load, listeners changed by reload, idle and header timeouts, graceful drain.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::*;

fn versioned(n: usize, a: std::net::SocketAddr, b: std::net::SocketAddr) -> String {
    format!(
        "{}routes:
  - name: r
    backends: [ {{ cluster: a, weight: {wa} }}, {{ cluster: b, weight: {wb} }} ]
    request_headers: {{ set: {{ x-config: \"{n}\" }} }}
    response_headers: {{ set: {{ x-config: \"{n}\" }} }}
    retries: {{ attempts: 1 }}
clusters:
  - {{ name: a, endpoints: [ {{ address: \"{a}\" }} ] }}
  - {{ name: b, endpoints: [ {{ address: \"{b}\" }} ] }}
",
        base(),
        wa = 1 + n % 3,
        wb = 1 + (n + 1) % 3,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_reloads_under_load_fail_no_request() {
    let a = upstream("a", Behavior::default()).await;
    let b = upstream("b", Behavior::default()).await;
    let gw = gateway(&versioned(0, a.addr, b.addr)).await;
    let addr = gw.addr("main").await;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let stop = stop.clone();
        let done = done.clone();
        clients.push(tokio::spawn(async move {
            let c = client();
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let req = http::Request::get(format!("http://{addr}/"))
                    .header("host", "x")
                    .body(Default::default())
                    .unwrap();
                let r = send(&c, req).await;
                let seen = r.seen_header("x-config");
                let sent = r
                    .headers
                    .get("x-config")
                    .map(|v| v.to_str().unwrap().to_string());
                if r.status != 200 || seen != sent {
                    failures.push(format!("{} {:?} {:?}", r.status, seen, sent));
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }
    for n in 1..=100 {
        gw.reload(&versioned(n, a.addr, b.addr)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(c.await.unwrap());
    }
    assert!(done.load(Ordering::Relaxed) > 100, "load ran");
    assert!(
        failures.is_empty(),
        "each request is served wholly by one table, none fails: {failures:?}"
    );
    let m = admin_get(gw.admin(), "/metrics").await.body;
    assert!(m.contains("weir_config_reloads_total 100"), "{m}");
    assert!(m.contains("weir_config_version 101"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_are_added_changed_and_removed_by_reload() {
    let one = format!(
        "{}routes:\n  - {{ name: r, direct_response: {{ status: 200, body: hi }} }}\n",
        base()
    );
    let gw = gateway(&one).await;
    let main = gw.addr("main").await;
    let two = one.replace(
        "listeners:\n",
        "listeners:\n  - { name: extra, address: 127.0.0.1:0 }\n",
    );
    gw.reload(&two).await.unwrap();
    let extra = gw.addr("extra").await;
    assert_eq!(get(extra, "x", "/", &[]).await.body, "hi");
    assert_eq!(
        gw.addr("main").await,
        main,
        "unchanged listeners keep their socket"
    );

    // Keep a connection open on the listener that is about to go.
    let c = client();
    let r = send(
        &c,
        http::Request::get(format!("http://{extra}/"))
            .body(Default::default())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    gw.reload(&one).await.unwrap();
    assert!(gw.gateway.listener_addr("extra").await.is_none());
    let mut refused = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(extra).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "the removed listener no longer accepts");
    assert_eq!(get(main, "x", "/", &[]).await.body, "hi");

    // Changing the address of a listener moves it.
    let moved_port = free_port();
    gw.reload(&one.replace(
        "{ name: main, address: 127.0.0.1:0 }",
        &format!("{{ name: main, address: 127.0.0.1:{moved_port} }}"),
    ))
    .await
    .unwrap();
    assert_eq!(gw.addr("main").await.port(), moved_port);
    assert_eq!(get(gw.addr("main").await, "x", "/", &[]).await.body, "hi");

    // The admin listener moves too.
    let old_admin = gw.admin();
    let admin_port = free_port();
    gw.reload(&one.replace(
        "admin: { address: 127.0.0.1:0 }",
        &format!("admin: {{ address: \"127.0.0.1:{admin_port}\" }}"),
    ))
    .await
    .unwrap();
    assert_eq!(gw.admin().port(), admin_port);
    assert_eq!(admin_get(gw.admin(), "/ready").await.status, 200);
    let mut old_closed = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(old_admin).await.is_err() {
            old_closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(old_closed, "the old admin address is released");

    // A listener that cannot bind rejects the reload and changes nothing.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    let bad = one.replace(
        "listeners:\n",
        &format!("listeners:\n  - {{ name: busy, address: \"{busy}\" }}\n"),
    );
    let err = gw.reload(&bad).await.unwrap_err();
    assert!(err.to_string().contains("cannot listen on"), "{err}");
    assert!(gw.gateway.listener_addr("busy").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_closed_at_the_header_timeout_and_idle_connections_close() {
    let cfg = "admin: { address: 127.0.0.1:0 }\nserver: { watch: false }\nlisteners:\n  - { name: main, address: 127.0.0.1:0, limits: { request_header_timeout: 500ms, idle_timeout: 700ms } }\nroutes:\n  - { name: r, direct_response: { status: 200 } }\n".to_string();
    let gw = gateway(&cfg).await;
    let addr = gw.addr("main").await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n").await.unwrap();
    let mut closed = false;
    // Trickle a header byte every 100 ms: still cut at the header timeout.
    for _ in 0..50 {
        if s.write_all(b"X").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                assert!(text.starts_with("HTTP/1.1 408"), "{text}");
            }
            Err(_) => {}
        }
    }
    assert!(closed, "the slow connection was closed within 5 s");

    // An idle keep-alive connection is closed after idle_timeout.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let end = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("closed by the idle timeout");
    assert_eq!(end.unwrap_or(0), 0);
}

#[test]
fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let slow = rt.block_on(upstream(
        "slow",
        Behavior {
            slow_first: 10,
            delay: Duration::from_millis(1500),
            ..Default::default()
        },
    ));
    let port = free_port();
    let (_dir, path) = config_file(&format!(
        "admin: {{ address: \"\" }}\nserver: {{ watch: false }}\nlisteners:\n  - {{ name: main, address: \"127.0.0.1:{port}\" }}\nroutes:\n  - {{ name: r, backends: [ {{ cluster: c }} ] }}\nclusters:\n  - {{ name: c, endpoints: [ {{ address: \"{}\" }} ] }}\n",
        slow.addr
    ));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("run")
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGHUP reloads the file.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("routes:\n", "routes:\n  - { name: hup, match: { path: { exact: /hup } }, direct_response: { status: 200, body: reloaded } }\n")).unwrap();
    let hup = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(hup.success());
    let mut reloaded = false;
    for _ in 0..100 {
        if rt.block_on(get(addr, "x", "/hup", &[])).body == "reloaded" {
            reloaded = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(reloaded, "SIGHUP reloaded the config");

    let in_flight = rt.spawn(async move { get(addr, "x", "/", &[]).await.status });
    std::thread::sleep(Duration::from_millis(300));
    let kill = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(kill.success());
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "no new connections while draining"
    );
    assert_eq!(
        rt.block_on(in_flight).unwrap(),
        200,
        "the in-flight request completes"
    );
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_file_is_reloaded_and_a_broken_one_is_not() {
    let cfg = |body: &str| {
        format!(
            "admin: {{ address: 127.0.0.1:0 }}\nlisteners:\n  - {{ name: main, address: 127.0.0.1:0 }}\nroutes:\n  - {{ name: r, direct_response: {{ status: 200, body: {body} }} }}\n"
        )
    };
    let gw = gateway(&cfg("one")).await;
    let addr = gw.addr("main").await;
    let wait_for = |want: &'static str| async move {
        for _ in 0..100 {
            if get(addr, "x", "/", &[]).await.body == want {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    gw.write(&cfg("two"));
    assert!(
        wait_for("two").await,
        "the watcher reloaded the changed file"
    );
    gw.write("routes: [ { name: r, direct_response: { status: 999 } } ]\n");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        get(addr, "x", "/", &[]).await.body,
        "two",
        "the broken file is rejected"
    );
    let m = admin_get(gw.admin(), "/metrics").await.body;
    assert!(m.contains("weir_config_reload_failures_total 1"), "{m}");
}
