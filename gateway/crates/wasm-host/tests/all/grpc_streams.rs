//! gRPC streams from filters (`proxy_grpc_stream`, send, cancel, close) against a real server.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use weir_wasm_host::{Decision, FailPolicy, LocalReply, Plugin};

use crate::support::grpc_server::GrpcServer;
use crate::support::{TestEnv, engine, exchange, hv, info, plugin, request};

/// A server, an environment whose cluster `echo` is that server, and a `grpcstream` plugin.
async fn setup(vm_id: &str, config: &str) -> (GrpcServer, Arc<TestEnv>, Arc<Plugin>) {
    let server = GrpcServer::start().await;
    let env = TestEnv::new();
    env.grpc_clusters
        .lock()
        .unwrap()
        .insert("echo".into(), server.addr);
    let p = plugin(
        &engine(1),
        &env,
        "grpcstream",
        vm_id,
        config,
        FailPolicy::Closed,
    );
    (server, env, p)
}

/// The local reply a `/chat` request ends with (the filter answers when its stream closes).
async fn chat(p: &Arc<Plugin>, headers: &[(&str, &str)]) -> LocalReply {
    let x = tokio::time::timeout(
        Duration::from_secs(5),
        exchange(p, request("/chat", headers)),
    )
    .await
    .expect("the stream closed in time");
    match x.request_decision {
        Decision::LocalReply(r) => *r,
        other => panic!("expected the filter's reply, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_echoed_in_order_with_metadata_and_status() {
    let (server, _env, p) = setup("grpcs-echo", "").await;
    // Half-closed with proxy_grpc_close, then with end_stream on the last send.
    for half_close in ["close", "end"] {
        let r = chat(&p, &[("x-half-close", half_close)]).await;
        assert_eq!(r.status, StatusCode::OK);
        let h = &r.headers;
        assert_eq!(hv(h, "x-events"), Some("init,msg,msg,msg,trail,close"));
        assert_eq!(hv(h, "x-received"), Some("one|two|three"));
        let initial = hv(h, "x-initial").unwrap();
        for pair in [
            ":status=200",
            "content-type=application/grpc",
            "x-echo=initial",
        ] {
            assert!(initial.contains(pair), "{pair} in {initial}");
        }
        let trailers = hv(h, "x-trailers").unwrap();
        for pair in ["grpc-status=0", "x-echo-trailer=done"] {
            assert!(trailers.contains(pair), "{pair} in {trailers}");
        }
        assert_eq!(hv(h, "x-close-status"), Some("0"));
        assert_eq!(hv(h, "x-close-message"), Some(""));
        let seen = server.ended("Chat").await;
        assert_eq!(seen.ending, Some("half-closed"), "{half_close}");
        assert_eq!(seen.messages, ["one", "two", "three"]);
        assert_eq!(seen.authority, "echo");
        assert_eq!(seen.headers["content-type"], "application/grpc");
        assert_eq!(seen.headers["te"], "trailers");
        assert_eq!(seen.headers["x-user"], "alice");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_reach_their_own_contexts() {
    let (_server, _env, p) = setup("grpcs-concurrent", "").await;
    let runs = (0..6).map(|i| {
        let p = p.clone();
        tokio::spawn(async move {
            let list = format!("a{i},b{i}");
            let r = chat(&p, &[("x-messages", list.as_str())]).await;
            (i, r)
        })
    });
    for run in runs {
        let (i, r) = run.await.unwrap();
        assert_eq!(
            hv(&r.headers, "x-received"),
            Some(format!("a{i}|b{i}").as_str())
        );
        assert_eq!(hv(&r.headers, "x-close-status"), Some("0"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_status_and_message_reach_on_grpc_close() {
    let (_server, env, p) = setup("grpcs-status", "").await;
    let r = chat(&p, &[("x-status", "7")]).await;
    assert_eq!(hv(&r.headers, "x-close-status"), Some("7"));
    assert_eq!(hv(&r.headers, "x-close-message"), Some("as asked"));
    assert_eq!(hv(&r.headers, "x-received"), Some("one|two|three"));
    // A trailers-only answer: its headers are the trailing metadata.
    let r = chat(&p, &[("x-method", "Fail")]).await;
    assert_eq!(hv(&r.headers, "x-events"), Some("trail,close"));
    assert_eq!(hv(&r.headers, "x-close-status"), Some("5"));
    assert_eq!(hv(&r.headers, "x-close-message"), Some("no such thing"));
    // An upstream that cannot be reached: UNAVAILABLE, no other callback.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = closed.local_addr().unwrap();
    drop(closed);
    env.grpc_clusters
        .lock()
        .unwrap()
        .insert("down".into(), down);
    let r = chat(&p, &[("x-cluster", "down")]).await;
    assert_eq!(hv(&r.headers, "x-events"), Some("close"));
    assert_eq!(hv(&r.headers, "x-close-status"), Some("14"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_cap_closes_with_resource_exhausted() {
    let (server, _env, p) = setup("grpcs-big", "").await;
    let r = chat(&p, &[("x-method", "Big"), ("x-half-close", "none")]).await;
    assert_eq!(hv(&r.headers, "x-events"), Some("init,close"));
    assert_eq!(hv(&r.headers, "x-close-status"), Some("8"));
    let message = hv(&r.headers, "x-close-message").unwrap();
    assert!(message.contains("larger than"), "{message}");
    assert_eq!(server.ended("Big").await.ending, Some("reset"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_resets_the_stream_and_stops_callbacks() {
    let (server, _env, p) = setup("grpcs-cancel", "").await;
    let mut stream = p.new_stream(info());
    let mut head = request("/cancel", &[("x-method", "Flood")]);
    let d = tokio::time::timeout(
        Duration::from_secs(5),
        stream.on_request_headers(&mut head, true),
    )
    .await
    .unwrap();
    assert_eq!(d, Decision::Continue);
    assert_eq!(hv(&head.headers, "x-first"), Some("tick-0"));
    assert_eq!(hv(&head.headers, "x-send-after-cancel"), Some("not-found"));
    assert_eq!(server.ended("Flood").await.ending, Some("reset"));
    // Ticks the server sent before it saw the reset are dropped, not delivered.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut response = std::sync::Arc::new(weir_wasm_host::ResponseHead::default());
    assert_eq!(
        stream.on_response_headers(&mut response, true).await,
        Decision::Continue
    );
    assert_eq!(hv(&response.headers, "x-messages-seen"), Some("1"));
    assert_eq!(hv(&response.headers, "x-events"), Some("init,msg"));
    stream.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_cluster_and_unknown_token() {
    let (_server, env, p) = setup("grpcs-errors", "").await;
    let x = exchange(&p, request("/errors", &[])).await;
    assert_eq!(x.request_decision, Decision::Continue);
    let h = &x.request.headers;
    // Envoy answers PARSE_FAILURE for a cluster it does not know (the status the SDKs expect).
    assert_eq!(hv(h, "x-unknown-cluster"), Some("parse-failure"));
    assert_eq!(hv(h, "x-unknown-send"), Some("not-found"));
    assert_eq!(hv(h, "x-unknown-cancel"), Some("not-found"));
    assert_eq!(hv(h, "x-unknown-close"), Some("not-found"));
    assert_eq!(hv(h, "x-send-after-end"), Some("bad-argument"));
    // A cluster the environment cannot open streams to: INTERNAL_FAILURE at open time.
    let x = exchange(&p, request("/chat", &[("x-cluster", "auth")])).await;
    match x.request_decision {
        Decision::LocalReply(r) => {
            assert_eq!(hv(&r.headers, "x-open-error"), Some("internal-failure"))
        }
        other => panic!("expected the filter's 500, got {other:?}"),
    }
    assert!(env.calls.lock().unwrap().is_empty(), "no HTTP callout made");
}

/// Wait (up to 5 s) until the server got `message` on a `Chat` stream.
async fn wait_for_message(server: &GrpcServer, message: &str) {
    for _ in 0..500 {
        let got = server
            .streams()
            .iter()
            .any(|s| s.path == "/weir.Echo/Chat" && s.messages.iter().any(|m| m == message));
        if got {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the server never got {message}: {:?}", server.streams());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_with_the_request_that_opened_it() {
    let (server, _env, p) = setup("grpcs-linger", "").await;
    // The filter opens a stream, sends `x` and lets the request go on.
    let mut stream = p.new_stream(info());
    let mut head = request("/linger", &[]);
    assert_eq!(
        stream.on_request_headers(&mut head, true).await,
        Decision::Continue
    );
    wait_for_message(&server, "x").await;
    // The request finishes while the stream is open: the stream is reset with the context.
    let mut response = std::sync::Arc::new(weir_wasm_host::ResponseHead::default());
    stream.on_response_headers(&mut response, true).await;
    stream.finish();
    let seen = server.ended("Chat").await;
    assert_eq!(
        seen.ending,
        Some("reset"),
        "the stream was reset with its context"
    );
    assert_eq!(seen.messages, ["x"]);
    // The echo of `x`, had it come back, went nowhere: the VM is fine and serves on.
    assert_eq!(p.stats().traps, 0);
    let r = chat(&p, &[]).await;
    assert_eq!(hv(&r.headers, "x-received"), Some("one|two|three"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discarded_vm_cancels_its_streams() {
    let (server, _env, p) = setup("grpcs-trap", "").await;
    // A request whose stream stays open (never half-closed) and which waits for its close.
    let waiting = {
        let p = p.clone();
        tokio::spawn(async move {
            let mut stream = p.new_stream(info());
            let mut head = request("/chat", &[("x-messages", "a"), ("x-half-close", "none")]);
            stream.on_request_headers(&mut head, true).await
        })
    };
    wait_for_message(&server, "a").await;
    // Another request traps in the same VM: the VM is discarded with every stream in it.
    let x = exchange(&p, request("/trap", &[])).await;
    match x.request_decision {
        Decision::LocalReply(r) => assert_eq!(r.details, "wasm_fail_stream"),
        other => panic!("expected the failure reply, got {other:?}"),
    }
    assert_eq!(server.ended("Chat").await.ending, Some("reset"));
    let d = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiting request learned its VM is gone")
        .unwrap();
    match d {
        Decision::LocalReply(r) => assert_eq!(r.details, "wasm_fail_stream"),
        other => panic!("expected the failure reply, got {other:?}"),
    }
    assert_eq!(p.stats().traps, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_context_streams_from_on_configure() {
    let (server, _env, p) = setup("grpcs-root", "root-stream").await;
    let mut value = String::new();
    for _ in 0..500 {
        let x = exchange(&p, request("/root", &[])).await;
        value = hv(&x.request.headers, "x-value").unwrap().to_owned();
        if value != "none" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(value, "init,msg:r1,msg:r2,trail,close:0");
    let seen = server.ended("Chat").await;
    assert_eq!(seen.messages, ["r1", "r2"]);
    assert_eq!(seen.headers["x-user"], "root");
    assert_eq!(seen.ending, Some("half-closed"));
}
