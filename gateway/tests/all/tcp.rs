//! TCP listeners: proxying to a cluster and proxy-wasm network filters.
//!
//! Every test runs the gateway in front of real echo servers on 127.0.0.1; the client is a
//! plain `TcpStream` (or TLS over it).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// An echo server: writes back every byte it reads and half-closes when the client does.
struct Echo {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn echo() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                _ = &mut stopped => return,
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Echo {
        addr,
        accepted,
        _stop: stop,
    }
}

/// A config with one `tcp` listener `tcp` proxying to cluster `echo` at `upstream`, plus
/// `extra` YAML appended (more listeners go under `listeners:` through `listeners_extra`).
fn tcp_config(upstream: SocketAddr, listener_extra: &str, extra: &str) -> String {
    format!(
        "admin: {{ address: 127.0.0.1:0 }}\nserver: {{ watch: false, drain_timeout: 300ms }}\nlisteners:\n  - {{ name: tcp, address: 127.0.0.1:0, protocol: tcp, tcp_proxy: {{ cluster: echo }}{listener_extra} }}\nclusters:\n  - {{ name: echo, endpoints: [ {{ address: \"{upstream}\" }} ], connect_timeout: 1s }}\n{extra}"
    )
}

/// An access log in `dir` with Envoy's TCP-relevant fields.
fn access_log(dir: &Path) -> (String, std::path::PathBuf) {
    let path = dir.join("access.log");
    let yaml = format!(
        "access_log: {{ enabled: true, path: \"{}\", format: \"%UPSTREAM_CLUSTER% %UPSTREAM_HOST% %BYTES_RECEIVED% %BYTES_SENT% %RESPONSE_FLAGS% %RESPONSE_CODE% %PROTOCOL% \\\"%REQ(:METHOD)% %REQ(:PATH)%\\\" %RESPONSE_CODE_DETAILS% %REQUESTED_SERVER_NAME%\" }}\n",
        path.display()
    );
    (yaml, path)
}

/// The access log's lines once it has `n` of them.
async fn log_lines(path: &Path, n: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for _ in 0..250 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        lines = text.lines().map(str::to_string).collect();
        if lines.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lines
}

/// Read exactly `n` bytes (within 10 s).
async fn read_n<S: AsyncRead + Unpin>(s: &mut S, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
        .await
        .expect("read timed out")
        .expect("read failed");
    buf
}

/// Whether the peer closes the connection within `wait` (EOF or reset), reading and
/// discarding what comes before.
async fn closed_within<S: AsyncRead + Unpin>(s: &mut S, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Write `data` and read the echo back.
async fn round_trip<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, data: &[u8]) -> Vec<u8> {
    s.write_all(data).await.unwrap();
    read_n(s, data.len()).await
}

/// The first `/metrics` line starting with `prefix`.
async fn metric(admin: SocketAddr, prefix: &str) -> String {
    let body = admin_get(admin, "/metrics").await.body;
    body.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` in /metrics:\n{body}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_relays_bytes_both_ways_with_half_close_counters_and_log() {
    let up = echo().await;
    let dir = tempfile::tempdir().unwrap();
    let (log_yaml, log) = access_log(dir.path());
    let gw = gateway(&tcp_config(up.addr, "", &log_yaml)).await;
    let addr = gw.addr("tcp").await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    assert_eq!(round_trip(&mut c, b"hello").await, b"hello");
    // More than the relay's read chunk and output watermark.
    let big: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    let writer = {
        let to_send = big.clone();
        let (mut r, mut w) = c.into_split();
        let sent = tokio::spawn(async move {
            w.write_all(&to_send).await.unwrap();
            // Half-close: the echo server sees the end, answers the rest and closes.
            w.shutdown().await.unwrap();
            w
        });
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut got))
            .await
            .expect("the gateway forwards the upstream's close")
            .unwrap();
        assert_eq!(got.len(), big.len());
        assert!(got == big, "bytes arrive unchanged and in order");
        sent
    };
    writer.await.unwrap();
    let total = (5 + big.len()) as u64;
    let lines = log_lines(&log, 1).await;
    assert_eq!(
        lines,
        [format!(
            "echo {} {total} {total} - 0 - \"- -\" - -",
            up.addr
        )],
        "one line per connection with Envoy's TCP fields"
    );
    assert_eq!(
        metric(gw.admin(), "weir_tcp_connections_total{listener=\"tcp\"}").await,
        "weir_tcp_connections_total{listener=\"tcp\"} 1"
    );
    assert_eq!(
        metric(
            gw.admin(),
            "weir_tcp_received_bytes_total{listener=\"tcp\"}"
        )
        .await,
        format!("weir_tcp_received_bytes_total{{listener=\"tcp\"}} {total}")
    );
    assert_eq!(
        metric(gw.admin(), "weir_tcp_sent_bytes_total{listener=\"tcp\"}").await,
        format!("weir_tcp_sent_bytes_total{{listener=\"tcp\"}} {total}")
    );
    assert_eq!(
        metric(gw.admin(), "weir_tcp_connections_active{listener=\"tcp\"}").await,
        "weir_tcp_connections_active{listener=\"tcp\"} 0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_upstream_refused_closes_the_connection() {
    // A port nobody listens on.
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let (log_yaml, log) = access_log(dir.path());
    let gw = gateway(&tcp_config(refused, "", &log_yaml)).await;
    let mut c = TcpStream::connect(gw.addr("tcp").await).await.unwrap();
    let _ = c.write_all(b"anyone there?").await;
    assert!(closed_within(&mut c, Duration::from_secs(5)).await);
    let lines = log_lines(&log, 1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with(&format!("echo {refused} ")) && lines[0].contains(" UF 0 - "),
        "{lines:?}"
    );
    assert!(lines[0].contains("upstream_connect_failure"), "{lines:?}");
    assert_eq!(
        metric(
            gw.admin(),
            "weir_tcp_upstream_failures_total{listener=\"tcp\"}"
        )
        .await,
        "weir_tcp_upstream_failures_total{listener=\"tcp\"} 1"
    );
    assert_eq!(
        metric(
            gw.admin(),
            "weir_cluster_connect_failures_total{cluster=\"echo\"}"
        )
        .await,
        "weir_cluster_connect_failures_total{cluster=\"echo\"} 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_idle_timeout_closes_a_quiet_connection() {
    let up = echo().await;
    let gw = gateway(&tcp_config(
        up.addr,
        ", limits: { idle_timeout: 400ms }",
        "",
    ))
    .await;
    let mut c = TcpStream::connect(gw.addr("tcp").await).await.unwrap();
    assert_eq!(round_trip(&mut c, b"ping").await, b"ping");
    // Traffic keeps it open past the timeout.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(round_trip(&mut c, b"ping").await, b"ping");
    }
    let quiet = Instant::now();
    assert!(closed_within(&mut c, Duration::from_secs(5)).await);
    assert!(
        quiet.elapsed() >= Duration::from_millis(350),
        "closed after {:?}",
        quiet.elapsed()
    );
}

/// A `network` guest plugin named `name` with `config` and failure policy `fail`.
fn network_plugin(name: &str, config: &str, fail: &str) -> String {
    format!(
        "  - {{ name: {name}, module: \"{}\", config: \"{config}\", fail: {fail} }}\n",
        guest("network").display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_network_filter_transforms_bytes_and_close_stream_closes() {
    let up = echo().await;
    let cfg = tcp_config(
        up.addr,
        ", filters: [net]",
        &format!("plugins:\n{}", network_plugin("net", "upper,tag", "closed")),
    );
    let gw = gateway(&cfg).await;
    let mut c = TcpStream::connect(gw.addr("tcp").await).await.unwrap();
    // Downstream bytes are upper-cased on the way up; the echo comes back tagged.
    c.write_all(b"hello").await.unwrap();
    assert_eq!(read_n(&mut c, 7).await, b"[HELLO]");
    c.write_all(b"again").await.unwrap();
    assert_eq!(read_n(&mut c, 7).await, b"[AGAIN]");
    // The filter closes the connection on QUIT.
    c.write_all(b"QUIT").await.unwrap();
    assert!(closed_within(&mut c, Duration::from_secs(5)).await);
    // The filter's counter (process-wide: other tests' connections count too).
    let line = metric(gw.admin(), "wasm_guest_net_connections").await;
    let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 1, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_network_filter_pauses_until_it_has_enough_bytes() {
    let up = echo().await;
    let cfg = tcp_config(
        up.addr,
        ", filters: [net]",
        &format!("plugins:\n{}", network_plugin("net", "min=6", "closed")),
    );
    let gw = gateway(&cfg).await;
    let mut c = TcpStream::connect(gw.addr("tcp").await).await.unwrap();
    c.write_all(b"abc").await.unwrap();
    // Held by the filter: nothing reaches the upstream yet.
    let mut buf = [0u8; 16];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), c.read(&mut buf))
            .await
            .is_err()
    );
    c.write_all(b"def").await.unwrap();
    assert_eq!(read_n(&mut c, 6).await, b"abcdef");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_trapping_filter_fails_closed_or_open() {
    let up = echo().await;
    let cfg = format!(
        "admin: {{ address: 127.0.0.1:0 }}\nserver: {{ watch: false }}\nlisteners:\n  - {{ name: closed, address: 127.0.0.1:0, protocol: tcp, tcp_proxy: {{ cluster: echo }}, filters: [net-closed] }}\n  - {{ name: open, address: 127.0.0.1:0, protocol: tcp, tcp_proxy: {{ cluster: echo }}, filters: [net-open] }}\nclusters:\n  - {{ name: echo, endpoints: [ {{ address: \"{}\" }} ] }}\nplugins:\n{}{}",
        up.addr,
        network_plugin("net-closed", "upper", "closed"),
        network_plugin("net-open", "upper", "open"),
    );
    let gw = gateway(&cfg).await;

    let mut c = TcpStream::connect(gw.addr("closed").await).await.unwrap();
    assert_eq!(round_trip(&mut c, b"abc").await, b"ABC");
    c.write_all(b"xTRAPx").await.unwrap();
    assert!(
        closed_within(&mut c, Duration::from_secs(5)).await,
        "failing closed closes the connection"
    );

    let mut c = TcpStream::connect(gw.addr("open").await).await.unwrap();
    assert_eq!(round_trip(&mut c, b"abc").await, b"ABC");
    // Failing open: the bytes pass unchanged, and the filter is skipped from then on.
    assert_eq!(round_trip(&mut c, b"xTRAPx").await, b"xTRAPx");
    assert_eq!(round_trip(&mut c, b"abc").await, b"abc");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_tls_terminated_listener_proxies_the_plaintext() {
    let up = echo().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, pem) = cert_files(dir.path(), "tcp", &["tcp.example.com"]);
    let (log_yaml, log) = access_log(dir.path());
    let tls = format!(", tls: {{ certificates: [ {{ cert: \"{cert}\", key: \"{key}\" }} ] }}");
    let gw = gateway(&tcp_config(up.addr, &tls, &log_yaml)).await;
    let (mut c, presented) = tls_connect(
        gw.addr("tcp").await,
        "tcp.example.com",
        &pem,
        &[b"h2", b"http/1.1"],
    )
    .await;
    assert_eq!(presented, pem_to_der(&pem));
    // A tcp listener offers no application protocol, even when the client asks for one.
    assert_eq!(c.get_ref().1.alpn_protocol(), None);
    assert_eq!(round_trip(&mut c, b"secret bytes").await, b"secret bytes");
    c.shutdown().await.unwrap();
    assert!(closed_within(&mut c, Duration::from_secs(5)).await);
    let lines = log_lines(&log, 1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].ends_with(" tcp.example.com"),
        "SNI logged: {lines:?}"
    );
    assert!(
        lines[0].contains(" 12 12 "),
        "plaintext byte counts: {lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_reload_keeps_open_connections_and_new_ones_use_the_new_config() {
    let a = echo().await;
    let b = echo().await;
    let gw = gateway(&tcp_config(a.addr, "", "")).await;
    let addr = gw.addr("tcp").await;
    let mut old = TcpStream::connect(addr).await.unwrap();
    assert_eq!(round_trip(&mut old, b"before").await, b"before");
    // Same listener, another upstream.
    gw.reload(&tcp_config(b.addr, "", "")).await.unwrap();
    assert_eq!(gw.addr("tcp").await, addr, "the listener keeps its socket");
    assert_eq!(
        round_trip(&mut old, b"after").await,
        b"after",
        "the open connection survives the reload"
    );
    let mut new = TcpStream::connect(addr).await.unwrap();
    assert_eq!(round_trip(&mut new, b"new").await, b"new");
    assert_eq!(a.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(
        b.accepted.load(Ordering::SeqCst),
        1,
        "new connections use the new cluster"
    );
    // The listener removed: open connections drain (drain_timeout 300ms), then close.
    gw.reload("admin: { address: 127.0.0.1:0 }\nserver: { watch: false, drain_timeout: 300ms }\n")
        .await
        .unwrap();
    assert_eq!(round_trip(&mut new, b"draining").await, b"draining");
    assert!(closed_within(&mut old, Duration::from_secs(5)).await);
    assert!(closed_within(&mut new, Duration::from_secs(5)).await);
}

#[test]
fn tcp_listener_config_errors_name_file_line_column() {
    let (code, err, _) = crate::config::validate(
        "listeners:
  - { name: a, address: 127.0.0.1:0, protocol: tcp }
  - { name: b, address: 127.0.0.1:0, protocol: udp }
  - { name: c, address: 127.0.0.1:0, protocol: tcp, tcp_proxy: { cluster: nope } }
  - { name: d, address: 127.0.0.1:0, tcp_proxy: { cluster: plain } }
  - { name: e, address: 127.0.0.1:0, protocol: tcp, tcp_proxy: { cluster: tls } }
  - name: f
    address: 127.0.0.1:0
    protocol: tcp
    tcp_proxy: { cluster: plain }
    limits: { max_request_headers: 10 }
routes:
  - { name: r, listeners: [c], direct_response: { status: 200 } }
clusters:
  - { name: plain, endpoints: [ { address: \"127.0.0.1:1\" } ] }
  - { name: tls, endpoints: [ { address: \"127.0.0.1:1\" } ], tls: { insecure_skip_verify: true } }
",
    );
    assert_eq!(code, 1, "{err}");
    for want in [
        "FILE:2:48: listeners[a].tcp_proxy: required with `protocol: tcp`",
        "FILE:3:48: listeners[b].protocol: unknown protocol `udp`: expected http or tcp",
        "FILE:4:75: listeners[c].tcp_proxy.cluster: unknown cluster `nope`",
        "FILE:5:60: listeners[d].tcp_proxy: only for `protocol: tcp` listeners",
        "FILE:6:75: listeners[e].tcp_proxy.cluster: cluster `tls` has `tls`",
        "FILE:7:11: listeners[f].limits: max_request_headers_bytes, max_request_headers",
        "FILE:13:28: routes[r].listeners: `c` is a tcp listener",
    ] {
        assert!(err.contains(want), "missing `{want}` in:\n{err}");
    }
    assert_eq!(err.lines().count(), 7, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_filter_holds_the_connection_until_its_callout_answers() {
    let up = echo().await;
    let allow = upstream("auth", Behavior::default()).await;
    let deny = upstream(
        "auth",
        Behavior {
            status: Some(403),
            ..Behavior::default()
        },
    )
    .await;
    let cfg = |auth: SocketAddr| {
        tcp_config(
            up.addr,
            ", filters: [net]",
            &format!(
                "  - {{ name: auth, endpoints: [ {{ address: \"{auth}\" }} ] }}\nplugins:\n{}",
                network_plugin("net", "callout,user=alice", "closed")
            ),
        )
    };
    let gw = gateway(&cfg(allow.addr)).await;
    let mut c = TcpStream::connect(gw.addr("tcp").await).await.unwrap();
    // Sent while the filter waits for the callout: passed on once it resumes.
    c.write_all(b"early").await.unwrap();
    assert_eq!(read_n(&mut c, 5).await, b"early");
    assert_eq!(allow.hits(), 1);
    assert_eq!(up.accepted.load(Ordering::SeqCst), 1);

    gw.reload(&cfg(deny.addr)).await.unwrap();
    let mut c = TcpStream::connect(gw.addr("tcp").await).await.unwrap();
    let _ = c.write_all(b"denied").await;
    assert!(closed_within(&mut c, Duration::from_secs(5)).await);
    assert_eq!(deny.hits(), 1);
    assert_eq!(
        up.accepted.load(Ordering::SeqCst),
        1,
        "no upstream connection for a connection the filter closed"
    );
}
