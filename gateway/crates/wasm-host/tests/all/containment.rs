//! Traps, deadlines and memory caps affect only the request in hand, with the failure policy.

use http::StatusCode;
use weir_wasm_host::{Decision, FailPolicy, Limits, Plugin, PluginConfig, ResponseHead};

use crate::support::{TestEnv, engine, exchange, guest, hv, info, plugin, request, try_plugin};

fn is_fail_stream(d: &Decision) -> bool {
    matches!(d, Decision::LocalReply(r)
        if r.status == StatusCode::SERVICE_UNAVAILABLE && r.details == "wasm_fail_stream")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_fail_closed() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(1),
        &env,
        "bad",
        "bad-closed",
        "",
        FailPolicy::Closed,
    );
    let x = exchange(&p, request("/", &[("x-trap", "1")])).await;
    assert!(
        is_fail_stream(&x.request_decision),
        "{:?}",
        x.request_decision
    );
    assert_eq!(p.stats().traps, 1);
    assert_eq!(p.stats().failed_streams, 1);
    // The local reply passes the filter's response callbacks: skipped, it failed.
    assert_eq!(x.response_decision, Decision::Continue);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_fail_open() {
    let env = TestEnv::new();
    let p = plugin(&engine(1), &env, "bad", "bad-open", "", FailPolicy::Open);
    let x = exchange(&p, request("/", &[("x-trap", "1")])).await;
    assert_eq!(x.request_decision, Decision::Continue);
    assert!(x.request.headers.get("x-bad-ok").is_none());
    assert!(
        x.response.headers.get("x-bad-resp").is_none(),
        "filter skipped"
    );
    assert_eq!(p.stats().traps, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_fail_reload_recreates_vm() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(1),
        &env,
        "bad",
        "bad-reload",
        "",
        FailPolicy::Reload,
    );
    assert_eq!(p.stats().vm_starts, 1);
    let x = exchange(&p, request("/", &[("x-trap", "1")])).await;
    assert!(is_fail_stream(&x.request_decision));
    assert_eq!(p.stats().vm_starts, 2, "VM recreated right away");
    // The next request runs on the new VM.
    let x = exchange(&p, request("/", &[])).await;
    assert_eq!(x.request_decision, Decision::Continue);
    assert_eq!(hv(&x.request.headers, "x-bad-ok"), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_recreates_after_backoff() {
    let env = TestEnv::new();
    let mut cfg = PluginConfig::new("bad-backoff", guest("bad"));
    cfg.vm_id = "bad-backoff".into();
    cfg.limits.restart_backoff = std::time::Duration::ZERO;
    let p = Plugin::new(&engine(1), cfg, env.clone()).unwrap();
    let x = exchange(&p, request("/", &[("x-trap", "1")])).await;
    assert!(is_fail_stream(&x.request_decision));
    let x = exchange(&p, request("/", &[])).await;
    assert_eq!(x.request_decision, Decision::Continue);
    assert_eq!(p.stats().vm_starts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infinite_loop_is_interrupted() {
    let env = TestEnv::new();
    let mut cfg = PluginConfig::new("bad-loop", guest("bad"));
    cfg.vm_id = "bad-loop".into();
    cfg.fail = FailPolicy::Reload;
    cfg.limits = Limits {
        callback_deadline: std::time::Duration::from_millis(20),
        ..Limits::default()
    };
    let p = Plugin::new(&engine(1), cfg, env.clone()).unwrap();
    let x = exchange(&p, request("/", &[("x-loop", "1")])).await;
    assert!(is_fail_stream(&x.request_decision));
    assert_eq!(p.stats().interruptions, 1);
    let x = exchange(&p, request("/", &[])).await;
    assert_eq!(x.request_decision, Decision::Continue);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_memory_growth_hits_the_cap() {
    let env = TestEnv::new();
    let mut cfg = PluginConfig::new("bad-grow", guest("bad"));
    cfg.vm_id = "bad-grow".into();
    cfg.fail = FailPolicy::Open;
    cfg.limits.memory_bytes = 16 << 20;
    let p = Plugin::new(&engine(1), cfg, env.clone()).unwrap();
    let x = exchange(&p, request("/", &[("x-grow", "1")])).await;
    assert_eq!(x.request_decision, Decision::Continue, "fail open");
    assert_eq!(p.stats().memory_cap_hits, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_streams_on_the_failed_vm_lose_their_context() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(1),
        &env,
        "bad",
        "bad-others",
        "",
        FailPolicy::Reload,
    );
    let mut a = p.new_stream(info());
    let mut head = request("/", &[]);
    assert_eq!(
        a.on_request_headers(&mut head, true).await,
        Decision::Continue
    );
    // Stream b traps on the same (only) replica.
    let x = exchange(&p, request("/", &[("x-trap", "1")])).await;
    assert!(is_fail_stream(&x.request_decision));
    // Stream a's context was in the discarded VM: it gets the failure policy.
    let mut resp = std::sync::Arc::new(ResponseHead::default());
    assert!(is_fail_stream(
        &a.on_response_headers(&mut resp, true).await
    ));
    assert!(a.is_bypassed());
    a.finish();
    assert_eq!(p.stats().failed_streams, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_phase_trap() {
    let env = TestEnv::new();
    let p = plugin(&engine(1), &env, "bad", "bad-resp", "", FailPolicy::Closed);
    let x = exchange(&p, request("/", &[("x-trap-response", "1")])).await;
    assert_eq!(x.request_decision, Decision::Continue);
    assert!(is_fail_stream(&x.response_decision));
}

async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..2000 {
        if cond() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("never happened: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_in_a_root_callback_reload() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(1),
        &env,
        "bad",
        "bad-tick-reload",
        "tick-trap-once",
        FailPolicy::Reload,
    );
    wait_for("a tick trapped", || p.stats().traps == 1).await;
    wait_for("the VM was recreated", || p.stats().vm_starts == 2).await;
    let x = exchange(&p, request("/", &[])).await;
    assert_eq!(x.request_decision, Decision::Continue);
    assert_eq!(p.stats().vm_starts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_in_a_root_callback_closed_recreates_on_next_request() {
    let env = TestEnv::new();
    let mut cfg = PluginConfig::new("bad-tick-closed", guest("bad"));
    cfg.vm_id = "bad-tick-closed".into();
    cfg.configuration = bytes::Bytes::from_static(b"tick-trap-once");
    cfg.limits.restart_backoff = std::time::Duration::ZERO;
    let p = Plugin::new(&engine(1), cfg, env.clone()).unwrap();
    wait_for("a tick trapped", || p.stats().traps == 1).await;
    assert_eq!(p.stats().vm_starts, 1, "Closed does not recreate at once");
    let x = exchange(&p, request("/", &[])).await;
    assert_eq!(x.request_decision, Decision::Continue);
    assert_eq!(p.stats().vm_starts, 2, "recreated by the next request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configure_failures_are_typed_errors() {
    let env = TestEnv::new();
    let e = try_plugin(
        &engine(1),
        &env,
        "bad",
        "bad-reject",
        "reject",
        FailPolicy::Closed,
    )
    .unwrap_err();
    assert!(
        matches!(e, weir_wasm_host::PluginError::ConfigureRejected { .. }),
        "{e}"
    );
    let e = try_plugin(
        &engine(1),
        &env,
        "bad",
        "bad-trapcfg",
        "trap-configure",
        FailPolicy::Closed,
    )
    .unwrap_err();
    assert!(
        matches!(e, weir_wasm_host::PluginError::Callback { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("bad-plugin"), "{e}");
}
