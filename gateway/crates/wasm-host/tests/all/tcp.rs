//! Network (TCP) filters: every network callback, buffers 2 and 3, pauses, resumes from a
//! callout and from a timer, close_stream, the failure policies and the buffer limit, driven
//! directly on `NetworkStream` (the gateway's sockets are tested in the gateway's tests).

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use weir_wasm_host::{
    Direction, FailPolicy, MetricValue, NetworkDecision, NetworkEvent, NetworkStream, PeerType,
    Plugin, PluginConfig, filter_metrics,
};

use crate::support::{TestEnv, engine, guest, info, plugin};

/// A network plugin of the `network` guest with `config`.
fn network(env: &Arc<TestEnv>, vm_id: &str, config: &str, fail: FailPolicy) -> Arc<Plugin> {
    plugin(&engine(1), env, "network", vm_id, config, fail)
}

/// Run one downstream (or upstream) chunk; returns the decision and the bytes passed on.
fn data(
    s: &mut NetworkStream,
    dir: Direction,
    bytes: &str,
    eos: bool,
) -> (NetworkDecision, String) {
    let mut buf = BytesMut::from(bytes.as_bytes());
    let d = match dir {
        Direction::Downstream => s.on_downstream_data(&mut buf, eos),
        Direction::Upstream => s.on_upstream_data(&mut buf, eos),
    };
    (d, String::from_utf8_lossy(&buf).into_owned())
}

/// The filter's log lines, in order.
fn logs(env: &TestEnv) -> Vec<String> {
    env.logs
        .lock()
        .unwrap()
        .iter()
        .map(|(_, _, m)| m.clone())
        .collect()
}

fn connections_metric() -> u64 {
    filter_metrics()
        .into_iter()
        .find(|m| m.name == "guest_net.connections")
        .map(|m| match m.value {
            MetricValue::Counter(v) => v,
            other => panic!("counter expected, got {other:?}"),
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_every_callback_in_envoy_order_with_buffers() {
    let env = TestEnv::new();
    let p = network(&env, "net-order", "upper,tag", FailPolicy::Closed);
    let before = connections_metric();
    let mut s = p.new_network_stream(info());
    assert_eq!(s.on_new_connection(), NetworkDecision::Continue);
    assert!(
        env.logged(
            "new connection source=10.0.0.7:4242 destination_port=8080 connection_id=77 request_path=none"
        ),
        "{:?}",
        logs(&env)
    );
    // The counter is the guest's, shared with the other tests' connections running alongside.
    assert!(connections_metric() > before, "the connection was counted");
    // Buffer 2 replaced: upper-cased.
    assert_eq!(
        data(&mut s, Direction::Downstream, "hello", false),
        (NetworkDecision::Continue, "HELLO".into())
    );
    s.set_upstream("backend", Some("192.0.2.1:9000".parse().unwrap()));
    // Buffer 3: prepended and appended.
    assert_eq!(
        data(&mut s, Direction::Upstream, "world", false),
        (NetworkDecision::Continue, "[world]".into())
    );
    // End of stream without bytes: nothing to tag.
    assert_eq!(
        data(&mut s, Direction::Upstream, "", true),
        (NetworkDecision::Continue, String::new())
    );
    s.on_upstream_close(PeerType::Remote);
    s.on_downstream_close(PeerType::Local);
    // Each close callback runs once.
    s.on_downstream_close(PeerType::Local);
    s.finish();
    let lines = logs(&env);
    let tail: Vec<&str> = lines
        .iter()
        .skip_while(|l| !l.starts_with("upstream close"))
        .map(String::as_str)
        .collect();
    assert_eq!(
        tail,
        [
            "upstream close peer=2",
            "downstream close peer=1",
            "done",
            "log down=5 up=5 upstream=192.0.2.1:9000 cluster=backend",
        ],
        "on_done runs before on_log for connections, as in Envoy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_pause_holds_bytes_until_the_filter_has_enough() {
    let env = TestEnv::new();
    let p = network(&env, "net-min", "min=6,pause-up=4,tag", FailPolicy::Closed);
    let mut s = p.new_network_stream(info());
    assert_eq!(s.on_new_connection(), NetworkDecision::Continue);
    assert_eq!(
        data(&mut s, Direction::Downstream, "abc", false),
        (NetworkDecision::Pause, String::new())
    );
    assert!(s.is_paused(Direction::Downstream));
    assert_eq!(
        data(&mut s, Direction::Downstream, "de", false),
        (NetworkDecision::Pause, String::new())
    );
    // The callback sees the accumulated bytes and passes them all on.
    assert_eq!(
        data(&mut s, Direction::Downstream, "fgh", false),
        (NetworkDecision::Continue, "abcdefgh".into())
    );
    assert!(!s.is_paused(Direction::Downstream));
    // Fewer bytes, but the end of stream: passed on.
    assert_eq!(
        data(&mut s, Direction::Downstream, "x", true),
        (NetworkDecision::Continue, "x".into())
    );
    // The upstream direction pauses independently.
    assert_eq!(
        data(&mut s, Direction::Upstream, "ab", false),
        (NetworkDecision::Pause, String::new())
    );
    assert_eq!(
        data(&mut s, Direction::Upstream, "cd", false),
        (NetworkDecision::Continue, "[abcd]".into())
    );
    s.finish();
    assert!(env.logged("log down=9 up=4"), "{:?}", logs(&env));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_close_stream_closes_the_connection_from_either_direction() {
    let env = TestEnv::new();
    let p = network(&env, "net-close", "", FailPolicy::Closed);
    let mut s = p.new_network_stream(info());
    assert_eq!(s.on_new_connection(), NetworkDecision::Continue);
    assert_eq!(
        data(&mut s, Direction::Downstream, "please QUIT now", false).0,
        NetworkDecision::Close
    );
    s.on_downstream_close(PeerType::Local);
    s.finish();
    assert!(env.logged("closing on QUIT"));
    assert!(env.logged("downstream close peer=1"));

    let mut s = p.new_network_stream(info());
    assert_eq!(s.on_new_connection(), NetworkDecision::Continue);
    assert_eq!(
        data(&mut s, Direction::Upstream, "BYE", false).0,
        NetworkDecision::Close
    );
    s.finish();
    assert!(env.logged("closing on BYE"));
    assert_eq!(p.stats().failed_streams, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_trap_fails_closed_or_open() {
    let env = TestEnv::new();
    let closed = network(&env, "net-trap-closed", "upper", FailPolicy::Closed);
    let mut s = closed.new_network_stream(info());
    assert_eq!(s.on_new_connection(), NetworkDecision::Continue);
    assert_eq!(
        data(&mut s, Direction::Downstream, "a TRAP", false).0,
        NetworkDecision::Close
    );
    s.finish();
    assert_eq!(closed.stats().traps, 1);
    assert_eq!(closed.stats().failed_streams, 1);

    let open = network(&env, "net-trap-open", "upper", FailPolicy::Open);
    let mut s = open.new_network_stream(info());
    assert_eq!(s.on_new_connection(), NetworkDecision::Continue);
    assert_eq!(
        data(&mut s, Direction::Downstream, "a TRAP", false),
        (NetworkDecision::Continue, "a TRAP".into()),
        "failing open passes the bytes through unchanged"
    );
    assert!(s.is_bypassed());
    // Skipped from now on: no upper-casing.
    assert_eq!(
        data(&mut s, Direction::Downstream, "abc", false),
        (NetworkDecision::Continue, "abc".into())
    );
    s.finish();
    assert_eq!(open.stats().failed_streams, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_failing_open_releases_held_bytes() {
    let env = TestEnv::new();
    let p = network(&env, "net-open-held", "min=100", FailPolicy::Open);
    let mut s = p.new_network_stream(info());
    assert_eq!(s.on_new_connection(), NetworkDecision::Continue);
    assert_eq!(
        data(&mut s, Direction::Downstream, "held ", false).0,
        NetworkDecision::Pause
    );
    // The trap comes with the next bytes: everything held passes through.
    assert_eq!(
        data(&mut s, Direction::Downstream, "TRAP", false),
        (NetworkDecision::Continue, "held TRAP".into())
    );
    assert!(!s.is_paused(Direction::Downstream));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_callout_resumes_or_closes_a_paused_connection() {
    let env = TestEnv::new();
    let p = network(
        &env,
        "net-callout",
        // The auth callout answers only when the test opens the gate.
        "callout,user=gated,upper",
        FailPolicy::Closed,
    );
    let mut s = p.new_network_stream(info());
    assert_eq!(s.on_new_connection(), NetworkDecision::Pause);
    assert!(s.is_paused(Direction::Downstream));
    // Bytes before the answer are held.
    assert_eq!(
        data(&mut s, Direction::Downstream, "early", false),
        (NetworkDecision::Pause, String::new())
    );
    env.gate.add_permits(1);
    let event = tokio::time::timeout(Duration::from_secs(5), s.resumed())
        .await
        .expect("the callout answers");
    assert_eq!(event, NetworkEvent::Resumed(Direction::Downstream));
    assert_eq!(
        s.take_held(Direction::Downstream),
        (BytesMut::from(&b"early"[..]), false)
    );
    assert!(env.logged("callout answered 200"));
    assert_eq!(
        data(&mut s, Direction::Downstream, "go", false),
        (NetworkDecision::Continue, "GO".into())
    );
    s.finish();

    let p = network(
        &env,
        "net-callout-deny",
        "callout,user=bob",
        FailPolicy::Closed,
    );
    let mut s = p.new_network_stream(info());
    assert_eq!(s.on_new_connection(), NetworkDecision::Pause);
    let event = tokio::time::timeout(Duration::from_secs(5), s.resumed())
        .await
        .expect("the callout answers");
    assert_eq!(event, NetworkEvent::Close);
    assert!(env.logged("callout answered 401"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_timer_in_the_root_context_resumes_a_paused_connection() {
    let env = TestEnv::new();
    let p = network(&env, "net-tick", "tick", FailPolicy::Closed);
    let mut s = p.new_network_stream(info());
    assert_eq!(s.on_new_connection(), NetworkDecision::Pause);
    // Bytes that reached the filter while it waited are held, unseen.
    s.hold(Direction::Downstream, BytesMut::from(&b"early"[..]), false);
    let event = tokio::time::timeout(Duration::from_secs(5), s.resumed())
        .await
        .expect("the tick resumes the connection");
    assert_eq!(event, NetworkEvent::Resumed(Direction::Downstream));
    assert_eq!(
        s.take_held(Direction::Downstream),
        (BytesMut::from(&b"early"[..]), false)
    );
    // Nothing else is pending: `resumed` waits.
    assert!(
        tokio::time::timeout(Duration::from_millis(50), s.resumed())
            .await
            .is_err()
    );
    s.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_held_bytes_past_the_limit_close_the_connection() {
    let env = TestEnv::new();
    let mut cfg = PluginConfig::new("net-limit", guest("network"));
    cfg.vm_id = "net-limit".into();
    cfg.configuration = "min=1000".into();
    cfg.limits.body_buffer_bytes = 16;
    let p = Plugin::new(&engine(1), cfg, env.clone()).unwrap();
    let mut s = p.new_network_stream(info());
    assert_eq!(s.on_new_connection(), NetworkDecision::Continue);
    assert_eq!(
        data(&mut s, Direction::Downstream, "0123456789", false).0,
        NetworkDecision::Pause
    );
    assert_eq!(
        data(&mut s, Direction::Downstream, "0123456789", false).0,
        NetworkDecision::Close
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_http_only_filter_on_a_connection_gets_its_failure_policy() {
    // The Rust SDK traps when an HTTP-context plugin is driven as a network filter (as in
    // Envoy): the connection gets the plugin's failure policy.
    let env = TestEnv::new();
    let p = plugin(&engine(1), &env, "http", "net-http", "", FailPolicy::Closed);
    let mut s = p.new_network_stream(info());
    assert_eq!(s.on_new_connection(), NetworkDecision::Close);
    s.finish();
    assert_eq!(p.stats().failed_streams, 1);
    let p = plugin(
        &engine(1),
        &env,
        "http",
        "net-http-open",
        "",
        FailPolicy::Open,
    );
    let mut s = p.new_network_stream(info());
    assert_eq!(s.on_new_connection(), NetworkDecision::Continue);
    assert_eq!(
        data(&mut s, Direction::Downstream, "raw", false),
        (NetworkDecision::Continue, "raw".into())
    );
}
