//! Worker threads: each accepts and serves connections itself, with a VM replica of its own,
//! and counts its connections on `/metrics`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::support::*;

/// The sum of a metric's series whose line starts with `prefix`, and how many series there were.
async fn series_sum(admin: SocketAddr, prefix: &str) -> (u64, usize) {
    let body = admin_get(admin, "/metrics").await.body;
    let values: Vec<u64> = body
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    (values.iter().sum(), values.len())
}

/// A keep-alive HTTP/1.1 connection to `addr`.
async fn connect(addr: SocketAddr) -> SendRequest<Full<Bytes>> {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    send
}

/// The status of one `GET /` on `c`, body read.
async fn get_on(c: &mut SendRequest<Full<Bytes>>) -> u16 {
    let req = Request::get("/")
        .header("host", "x")
        .body(Full::new(Bytes::new()))
        .unwrap();
    // The connection is ready again once the previous exchange is wholly done.
    c.ready().await.unwrap();
    let resp = c.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    resp.into_body().collect().await.unwrap();
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_worker_has_its_own_vm_and_counts_the_connections_it_serves() {
    let up = upstream("up", Behavior::default()).await;
    let cfg = format!(
        "{}plugins:\n  - {{ name: n, module: \"builtin:noop\" }}\nroutes:\n  - {{ name: r, filters: [n], backends: [ {{ cluster: up }} ] }}\nclusters:\n  - {{ name: up, endpoints: [ {{ address: \"{}\" }} ] }}\n",
        base(),
        up.addr
    );
    let gw = gateway_with_workers(&cfg, 3).await;
    let (addr, admin) = (gw.addr("main").await, gw.admin());
    assert_eq!(gw.gateway.shared().workers.count(), 3);
    let vms = series_sum(admin, "weir_wasm_vms ").await;
    assert_eq!(vms, (3, 1), "one replica of the plugin's VM per worker");

    let mut conns = Vec::new();
    for _ in 0..9 {
        let mut c = connect(addr).await;
        for _ in 0..2 {
            assert_eq!(get_on(&mut c).await, 200);
        }
        conns.push(c);
    }
    let (total, series) = series_sum(admin, "weir_worker_downstream_connections_total{").await;
    assert_eq!(
        (total, series),
        (9, 3),
        "every connection counted by one worker"
    );
    let (all, _) = series_sum(admin, "weir_downstream_connections_total ").await;
    assert_eq!(all, 9);
    let (active, _) = series_sum(admin, "weir_worker_downstream_connections_active{").await;
    assert_eq!(active, 9);

    drop(conns);
    let mut open = u64::MAX;
    for _ in 0..100 {
        open = series_sum(admin, "weir_worker_downstream_connections_active{")
            .await
            .0;
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(open, 0, "closed connections leave their worker's gauge");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_spread_evenly_over_the_workers() {
    let cfg = format!(
        "{}routes:\n  - {{ name: r, direct_response: {{ status: 200, body: ok }} }}\n",
        base()
    );
    let gw = gateway_with_workers(&cfg, 3).await;
    let (addr, admin) = (gw.addr("main").await, gw.admin());
    // One after another, so every accept sees the counts the previous one left.
    let mut conns = Vec::new();
    for _ in 0..12 {
        let mut c = connect(addr).await;
        assert_eq!(get_on(&mut c).await, 200);
        conns.push(c);
    }
    let body = admin_get(admin, "/metrics").await.body;
    let open: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("weir_worker_downstream_connections_active{"))
        .collect();
    assert_eq!(
        open,
        [
            "weir_worker_downstream_connections_active{worker=\"0\"} 4",
            "weir_worker_downstream_connections_active{worker=\"1\"} 4",
            "weir_worker_downstream_connections_active{worker=\"2\"} 4",
        ],
        "whichever worker accepts, the least busy one serves"
    );
    // Requests on the moved connections are served.
    for c in &mut conns {
        assert_eq!(get_on(c).await, 200);
    }
}

#[test]
fn weir_run_takes_a_worker_count_and_rejects_zero() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["run", "/nonexistent.yaml", "--workers", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--workers"), "{err}");

    let admin_port = free_port();
    let (_dir, path) = config_file(&format!(
        "admin: {{ address: \"127.0.0.1:{admin_port}\" }}\nserver: {{ watch: false }}\nlisteners:\n  - {{ name: main, address: 127.0.0.1:0 }}\n"
    ));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("run")
        .arg(&path)
        .args(["--workers", "3"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let mut series = 0;
    for _ in 0..200 {
        if std::net::TcpStream::connect(admin).is_ok() {
            series = rt
                .block_on(series_sum(
                    admin,
                    "weir_worker_downstream_connections_total{",
                ))
                .1;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(series, 3, "one series per worker");
}
