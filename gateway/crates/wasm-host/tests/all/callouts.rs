//! HTTP callouts, timers, shared queues.

use std::time::Duration;

use http::StatusCode;
use weir_wasm_host::{Decision, FailPolicy};

use crate::support::{TestEnv, engine, exchange, hv, plugin, request};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_call_then_resume() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(1),
        &env,
        "callout",
        "callout-ok",
        "",
        FailPolicy::Closed,
    );
    let x = exchange(&p, request("/api", &[("x-user", "alice")])).await;
    assert_eq!(x.request_decision, Decision::Continue);
    assert_eq!(hv(&x.request.headers, "x-auth"), Some("ok-alice"));
    // :status + x-from
    assert_eq!(hv(&x.request.headers, "x-callout-headers"), Some("2"));
    let calls = env.calls.lock().unwrap();
    let call = calls.last().unwrap();
    assert_eq!(call.method(), http::Method::GET);
    assert_eq!(call.uri().path(), "/check");
    assert_eq!(call.headers().get("host").unwrap(), "auth");
    assert_eq!(&call.body()[..], b"question");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_call_denied_and_failed() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(1),
        &env,
        "callout",
        "callout-deny",
        "",
        FailPolicy::Closed,
    );
    let x = exchange(&p, request("/api", &[("x-user", "bob")])).await;
    match &x.request_decision {
        Decision::LocalReply(r) => {
            assert_eq!(r.status, StatusCode::FORBIDDEN);
            assert_eq!(hv(&r.headers, "x-upstream-status"), Some("401"));
        }
        other => panic!("expected 403, got {other:?}"),
    }
    let x = exchange(&p, request("/api", &[("x-user", "fail")])).await;
    match &x.request_decision {
        Decision::LocalReply(r) => {
            assert_eq!(r.status, StatusCode::BAD_GATEWAY);
            assert_eq!(hv(&r.headers, "x-status"), Some("11"));
            assert_eq!(hv(&r.headers, "x-status-message"), Some("reset"));
        }
        other => panic!("expected 502, got {other:?}"),
    }
    let x = exchange(&p, request("/bad-cluster", &[])).await;
    assert_eq!(x.request_decision, Decision::Continue);
    assert_eq!(
        hv(&x.request.headers, "x-bad-cluster"),
        Some("bad-argument")
    );
    assert_eq!(
        hv(&x.request.headers, "x-bad-grpc-cluster"),
        Some("parse-failure")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_grpc_call() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(1),
        &env,
        "callout",
        "callout-grpc",
        "",
        FailPolicy::Closed,
    );
    let x = exchange(&p, request("/grpc", &[("x-user", "alice")])).await;
    assert_eq!(x.request_decision, Decision::Continue);
    assert_eq!(hv(&x.request.headers, "x-grpc"), Some("pong:ping"));
    {
        let calls = env.calls.lock().unwrap();
        let call = calls
            .iter()
            .find(|c| c.uri().path() == "/weir.Auth/Check")
            .unwrap();
        assert_eq!(call.method(), http::Method::POST);
        assert_eq!(
            call.headers().get("content-type").unwrap(),
            "application/grpc"
        );
        assert_eq!(call.headers().get("x-user").unwrap(), "alice");
        assert_eq!(&call.body()[..], b"\0\0\0\0\x04ping");
    }
    let x = exchange(&p, request("/grpc", &[("x-user", "grpc-deny")])).await;
    match &x.request_decision {
        Decision::LocalReply(r) => {
            assert_eq!(hv(&r.headers, "x-grpc-status"), Some("7"));
            assert_eq!(hv(&r.headers, "x-grpc-message"), Some("denied"));
        }
        other => panic!("expected a local reply, got {other:?}"),
    }
}

async fn poll_value(
    p: &std::sync::Arc<weir_wasm_host::Plugin>,
    path: &str,
    ok: impl Fn(&str) -> bool,
) -> String {
    // Waits (up to 20 s) for a background effect; not a timing assertion.
    let mut last = String::new();
    for _ in 0..2000 {
        let x = exchange(p, request(path, &[])).await;
        last = hv(&x.request.headers, "x-value").unwrap().to_owned();
        if ok(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{path} never satisfied the condition; last value {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_tick_in_root_context() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(1),
        &env,
        "callout",
        "callout-tick",
        "tick",
        FailPolicy::Closed,
    );
    poll_value(&p, "/ticks", |v| v.parse::<u64>().is_ok_and(|n| n >= 3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_context_callout() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(1),
        &env,
        "callout",
        "callout-root",
        "root-call",
        FailPolicy::Closed,
    );
    let v = poll_value(&p, "/root-call", |v| v != "none").await;
    assert_eq!(v, "200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_queue_wakes_registrant() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(2),
        &env,
        "callout",
        "callout-queue",
        "",
        FailPolicy::Closed,
    );
    let x = exchange(&p, request("/enqueue", &[("x-item", "item-1")])).await;
    assert_eq!(x.request_decision, Decision::Continue);
    let v = poll_value(&p, "/queue-last", |v| v == "item-1").await;
    assert_eq!(v, "item-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_plugin_stops_its_timers_and_frees_vms() {
    let env = TestEnv::new();
    let engine = engine(1);
    let p = plugin(
        &engine,
        &env,
        "callout",
        "callout-drop",
        "tick",
        FailPolicy::Closed,
    );
    let route = p
        .with_configuration(bytes::Bytes::from_static(b"tick"))
        .unwrap();
    poll_value(&p, "/ticks", |v| v != "none").await;
    assert_eq!(engine.loaded_vms(), 1);
    let weak = std::sync::Arc::downgrade(&p);
    drop(p);
    assert!(weak.upgrade().is_none(), "nothing else holds the plugin");
    assert_eq!(
        engine.loaded_vms(),
        1,
        "the per-route instance keeps the VM"
    );
    drop(route);
    // The VM goes away once its background task lets go (it holds it only while ticking).
    for _ in 0..1000 {
        if engine.loaded_vms() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        engine.loaded_vms(),
        0,
        "no task or timer keeps the VM alive"
    );
    // A new plugin of the same vm_id gets new VMs.
    let p2 = plugin(
        &engine,
        &env,
        "callout",
        "callout-drop",
        "",
        FailPolicy::Closed,
    );
    assert_eq!(p2.stats().vm_starts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fire_and_forget_callout_answered_before_the_response() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(1),
        &env,
        "callout",
        "callout-async",
        "",
        FailPolicy::Closed,
    );
    let mut stream = p.new_stream(crate::support::info());
    let mut head = request("/async", &[("x-user", "bob")]);
    assert_eq!(
        stream.on_request_headers(&mut head, true).await,
        Decision::Continue
    );
    // The callout runs as its own task while "the upstream" answers: wait for it.
    for _ in 0..2000 {
        if env.answered.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut resp = std::sync::Arc::new(weir_wasm_host::ResponseHead::default());
    match stream.on_response_headers(&mut resp, true).await {
        Decision::LocalReply(r) => assert_eq!(r.status, StatusCode::FORBIDDEN),
        other => panic!("the callout's local reply should win, got {other:?}"),
    }
    stream.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_context_answers_a_paused_stream() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(1),
        &env,
        "callout",
        "callout-wait",
        "tick",
        FailPolicy::Closed,
    );
    let x = exchange(&p, request("/wait", &[])).await;
    match &x.request_decision {
        Decision::LocalReply(r) => {
            assert_eq!(r.status, StatusCode::ACCEPTED);
            assert_eq!(hv(&r.headers, "x-released"), Some("by-tick"));
        }
        other => panic!("expected the tick's local reply, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_interleave_on_one_replica() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(1),
        &env,
        "callout",
        "callout-many",
        "",
        FailPolicy::Closed,
    );
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let p = p.clone();
            tokio::spawn(async move {
                let user = if i % 3 == 0 { "bob" } else { "alice" };
                let x = exchange(&p, request("/api", &[("x-user", user)])).await;
                (user, x.request_decision, x.request.headers.clone())
            })
        })
        .collect();
    for t in tasks {
        let (user, decision, headers) = t.await.unwrap();
        if user == "alice" {
            assert_eq!(decision, Decision::Continue);
            assert_eq!(hv(&headers, "x-auth"), Some("ok-alice"));
        } else {
            assert!(
                matches!(decision, Decision::LocalReply(ref r) if r.status == StatusCode::FORBIDDEN)
            );
        }
    }
    assert_eq!(p.stats().traps, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_dropped_while_waiting_for_its_callout() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(1),
        &env,
        "callout",
        "callout-cancel",
        "",
        FailPolicy::Closed,
    );
    {
        let mut stream = p.new_stream(crate::support::info());
        let mut head = request("/api", &[("x-user", "hang")]);
        // Cancel the callback at its first await (the callout).
        let r =
            tokio::time::timeout(Duration::ZERO, stream.on_request_headers(&mut head, true)).await;
        assert!(r.is_err(), "the callback was waiting for its callout");
        // Dropping the stream deletes its context.
    }
    let x = exchange(&p, request("/api", &[("x-user", "alice")])).await;
    assert_eq!(x.request_decision, Decision::Continue);
    assert_eq!(p.stats().traps, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_stream_fails_when_its_vm_is_discarded() {
    let env = TestEnv::new();
    // No timer: nothing releases the waiting stream but the failure of its VM.
    let mut cfg = weir_wasm_host::PluginConfig::new("wait-fail", crate::support::guest("callout"));
    cfg.vm_id = "callout-wait-fail".into();
    cfg.limits.restart_backoff = Duration::from_secs(60);
    let p = weir_wasm_host::Plugin::new(&engine(1), cfg, env.clone()).unwrap();
    let waiting = {
        let p = p.clone();
        tokio::spawn(async move { exchange(&p, request("/wait", &[])).await })
    };
    // Whichever runs first, the waiting stream ends with the failure policy.
    let x = exchange(&p, request("/trap", &[])).await;
    assert!(
        matches!(x.request_decision, Decision::LocalReply(ref r) if r.details == "wasm_fail_stream")
    );
    let x = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the waiting stream was woken")
        .unwrap();
    assert!(
        matches!(x.request_decision, Decision::LocalReply(ref r) if r.details == "wasm_fail_stream"),
        "{:?}",
        x.request_decision
    );
}
