//! Hand-written modules: ABI versions 0.1.0 and 0.2.0, missing marker, out-of-bounds pointers,
//! host calls in the wrong phase, failing allocators, WASI.

use std::sync::Arc;

use bytes::Bytes;
use weir_wasm_host::{
    AbiVersion, Decision, FailPolicy, HostEnv, Plugin, PluginConfig, PluginError,
};

use crate::support::{TestEnv, engine, exchange, hv, request};

const IMPORTS: &str = r#"
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get_value (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_pairs" (func $get_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_header_map_pairs" (func $set_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $local_reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $get_buffer (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_effective_context" (func $set_effective (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_unstable" "random_get" (func $random_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (import "wasi_snapshot_preview1" "path_open" (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
"#;

const COMMON: &str = r#"
  (memory (export "memory") 4)
  (data (i32.const 1024) "x-wat")
  (data (i32.const 1040) "yes")
  (data (i32.const 1056) ":path")
  (data (i32.const 1072) "\e8\03\00\00\00\00\00\00")
  (data (i32.const 1088) "hello from wasi\n")
  (data (i32.const 1120) "\40\04\00\00\10\00\00\00")
  (func $expect (param $got i32) (param $want i32)
    (if (i32.ne (local.get $got) (local.get $want)) (then unreachable)))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func $add_wat (param $map i32)
    (call $expect (call $add (local.get $map) (i32.const 1024) (i32.const 5) (i32.const 1040) (i32.const 3)) (i32.const 0)))
"#;

const BUMP_MALLOC: &str = r#"
  (global $heap (mut i32) (i32.const 8192))
  (func (export "malloc") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
"#;

fn module(marker: &str, malloc: &str, body: &str) -> Vec<u8> {
    let text = format!("(module {IMPORTS} {COMMON} {malloc} (func (export \"{marker}\")) {body})");
    wat::parse_str(&text).unwrap_or_else(|e| panic!("bad WAT: {e}"))
}

fn load(
    wasm: Vec<u8>,
    name: &str,
    config: &str,
    fail: FailPolicy,
    env: &Arc<TestEnv>,
) -> Result<Arc<Plugin>, PluginError> {
    let mut cfg = PluginConfig::new(name, wasm);
    cfg.vm_id = name.to_owned();
    cfg.configuration = Bytes::copy_from_slice(config.as_bytes());
    cfg.fail = fail;
    Plugin::new(&engine(1), cfg, env.clone() as Arc<dyn HostEnv>)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_abi_marker_is_rejected() {
    let wasm = wat::parse_str(
        r#"(module (memory (export "memory") 1) (func (export "proxy_on_context_create") (param i32 i32)))"#,
    )
    .unwrap();
    let e = load(wasm, "no-marker", "", FailPolicy::Closed, &TestEnv::new()).unwrap_err();
    assert!(matches!(e, PluginError::NoAbiMarker { .. }), "{e}");
    assert!(e.to_string().contains("no proxy-wasm ABI marker"));
    let e = load(
        b"garbage".to_vec(),
        "garbage",
        "",
        FailPolicy::Closed,
        &TestEnv::new(),
    )
    .unwrap_err();
    assert!(matches!(e, PluginError::Compile { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abi_0_1_0_module() {
    let body = r#"
      (import "env" "proxy_get_configuration" (func $get_configuration (param i32 i32) (result i32)))
      (import "env" "proxy_clear_route_cache" (func $clear_route_cache (result i32)))
      (import "env" "proxy_continue_request" (func $continue_request (result i32)))
    "#;
    // Imports must come first in a module: put the 0.1.0 imports in the import list.
    let text = format!(
        r#"(module {IMPORTS} {body} {COMMON} {BUMP_MALLOC}
          (func (export "proxy_abi_version_0_1_0"))
          (func (export "proxy_on_configure") (param i32 i32) (result i32)
            (call $expect (call $get_configuration (i32.const 2000) (i32.const 2004)) (i32.const 0))
            (call $expect (i32.load (i32.const 2004)) (i32.const 3))
            (i32.const 1))
          (func (export "proxy_on_request_headers") (param i32 i32) (result i32)
            (call $expect (call $get_configuration (i32.const 2000) (i32.const 2004)) (i32.const 1))
            (call $expect (call $clear_route_cache) (i32.const 0))
            (call $expect (call $continue_request) (i32.const 0))
            (call $add_wat (i32.const 0))
            (i32.const 0))
          (func (export "proxy_on_response_headers") (param i32 i32) (result i32)
            (call $add_wat (i32.const 2))
            (i32.const 0)))"#
    );
    let wasm = wat::parse_str(&text).unwrap();
    let p = load(wasm, "abi-010", "cfg", FailPolicy::Closed, &TestEnv::new()).unwrap();
    assert_eq!(p.abi_version(), AbiVersion::V0_1_0);
    let x = exchange(&p, request("/", &[])).await;
    assert_eq!(x.request_decision, Decision::Continue);
    assert!(x.route_cleared, "proxy_clear_route_cache");
    assert_eq!(hv(&x.request.headers, "x-wat"), Some("yes"));
    assert_eq!(hv(&x.response.headers, "x-wat"), Some("yes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abi_0_2_0_module_with_start_and_wasi() {
    let env = TestEnv::new();
    let wasm = module(
        "proxy_abi_version_0_2_0",
        BUMP_MALLOC,
        r#"
        (func (export "_start")
          (call $expect (call $fd_write (i32.const 1) (i32.const 1120) (i32.const 1) (i32.const 3000)) (i32.const 0))
          (call $expect (call $random_get (i32.const 3100) (i32.const 32)) (i32.const 0))
          (call $expect (call $clock (i32.const 0) (i64.const 0) (i32.const 3200)) (i32.const 0))
          (call $expect (call $path_open (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i64.const 0) (i64.const 0) (i32.const 0) (i32.const 0)) (i32.const 58))
          ;; Only logging and WASI during start.
          (call $expect (call $add (i32.const 0) (i32.const 1024) (i32.const 5) (i32.const 1040) (i32.const 3)) (i32.const 2))
          (call $proc_exit (i32.const 0)))
        (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
          (call $add_wat (i32.const 0))
          (i32.const 0))
        "#,
    );
    let p = load(wasm, "abi-020", "", FailPolicy::Closed, &env).unwrap();
    assert_eq!(p.abi_version(), AbiVersion::V0_2_0);
    assert!(env.logged("hello from wasi"));
    let x = exchange(&p, request("/", &[])).await;
    assert_eq!(hv(&x.request.headers, "x-wat"), Some("yes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_bounds_pointers_answer_invalid_memory_access() {
    let wasm = module(
        "proxy_abi_version_0_2_1",
        BUMP_MALLOC,
        r#"
        (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
          (call $expect (call $log (i32.const 2) (i32.const -16) (i32.const 100)) (i32.const 6))
          (call $expect (call $log (i32.const 2) (i32.const 1024) (i32.const -1)) (i32.const 6))
          (call $expect (call $get_value (i32.const 0) (i32.const 0x7fffffff) (i32.const 5) (i32.const 2000) (i32.const 2004)) (i32.const 6))
          (call $expect (call $get_value (i32.const 0) (i32.const 1056) (i32.const 5) (i32.const -4) (i32.const 2004)) (i32.const 6))
          (call $expect (call $get_value (i32.const 0) (i32.const 1056) (i32.const 5) (i32.const 262142) (i32.const 2004)) (i32.const 6))
          (call $expect (call $get_pairs (i32.const 0) (i32.const 2000) (i32.const -8)) (i32.const 6))
          (call $expect (call $set_pairs (i32.const 0) (i32.const 0) (i32.const 0x7fffffff)) (i32.const 6))
          (call $expect (call $set_pairs (i32.const 0) (i32.const 1072) (i32.const 8)) (i32.const 2))
          (call $expect (call $set_pairs (i32.const 99) (i32.const 1072) (i32.const 0)) (i32.const 2))
          (call $expect (call $local_reply (i32.const 200) (i32.const -100) (i32.const 200) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1)) (i32.const 6))
          (call $expect (call $local_reply (i32.const 200) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1072) (i32.const 8) (i32.const -1)) (i32.const 2))
          (call $expect (call $fd_write (i32.const 1) (i32.const -8) (i32.const 1) (i32.const 3000)) (i32.const 28))
          (call $expect (call $get_value (i32.const 0) (i32.const 1056) (i32.const 5) (i32.const 2000) (i32.const 2004)) (i32.const 0))
          (call $add_wat (i32.const 0))
          (i32.const 0))
        "#,
    );
    let p = load(wasm, "oob", "", FailPolicy::Closed, &TestEnv::new()).unwrap();
    let x = exchange(&p, request("/", &[])).await;
    assert_eq!(
        x.request_decision,
        Decision::Continue,
        "a check in the guest failed"
    );
    assert_eq!(hv(&x.request.headers, "x-wat"), Some("yes"));
    assert_eq!(p.stats().traps, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_calls_in_the_wrong_phase() {
    let env = TestEnv::new();
    let wasm = module(
        "proxy_abi_version_0_2_1",
        BUMP_MALLOC,
        r#"
        (func (export "_initialize")
          (call $expect (call $add (i32.const 0) (i32.const 1024) (i32.const 5) (i32.const 1040) (i32.const 3)) (i32.const 2))
          (call $expect (call $get_buffer (i32.const 7) (i32.const 0) (i32.const 100) (i32.const 2000) (i32.const 2004)) (i32.const 2))
          (call $expect (call $log (i32.const 2) (i32.const 1024) (i32.const 5)) (i32.const 0)))
        (func (export "proxy_on_configure") (param i32 i32) (result i32)
          (call $expect (call $get_value (i32.const 0) (i32.const 1056) (i32.const 5) (i32.const 2000) (i32.const 2004)) (i32.const 1))
          (call $expect (call $add (i32.const 0) (i32.const 1024) (i32.const 5) (i32.const 1040) (i32.const 3)) (i32.const 2))
          (call $expect (call $local_reply (i32.const 403) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1)) (i32.const 2))
          (call $expect (call $continue (i32.const 0)) (i32.const 1))
          (call $expect (call $get_buffer (i32.const 7) (i32.const 0) (i32.const 100) (i32.const 2000) (i32.const 2004)) (i32.const 0))
          (call $expect (i32.load (i32.const 2004)) (i32.const 3))
          (i32.const 1))
        (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
          (call $expect (call $get_buffer (i32.const 7) (i32.const 0) (i32.const 100) (i32.const 2000) (i32.const 2004)) (i32.const 1))
          (call $expect (call $get_buffer (i32.const 0) (i32.const 0) (i32.const 100) (i32.const 2000) (i32.const 2004)) (i32.const 1))
          (call $expect (call $set_effective (i32.const 99999)) (i32.const 2))
          (call $expect (call $get_value (i32.const 2) (i32.const 1056) (i32.const 5) (i32.const 2000) (i32.const 2004)) (i32.const 1))
          (call $expect (call $continue (i32.const 2)) (i32.const 1))
          (call $expect (call $continue (i32.const 9)) (i32.const 2))
          (call $add_wat (i32.const 0))
          (i32.const 0))
        "#,
    );
    let p = load(wasm, "phase", "cfg", FailPolicy::Closed, &env).unwrap();
    assert!(env.logged("x-wat"), "logging works during _initialize");
    let x = exchange(&p, request("/", &[])).await;
    assert_eq!(
        x.request_decision,
        Decision::Continue,
        "a check in the guest failed"
    );
    assert_eq!(hv(&x.request.headers, "x-wat"), Some("yes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_allocators() {
    // An allocator answering a pointer outside memory: the host call fails cleanly.
    let wasm = module(
        "proxy_abi_version_0_2_1",
        r#"(func (export "malloc") (param i32) (result i32) (i32.const -256))"#,
        r#"
        (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
          (call $expect (call $get_pairs (i32.const 0) (i32.const 2000) (i32.const 2004)) (i32.const 6))
          (call $add_wat (i32.const 0))
          (i32.const 0))
        "#,
    );
    let p = load(wasm, "bad-malloc", "", FailPolicy::Closed, &TestEnv::new()).unwrap();
    let x = exchange(&p, request("/", &[])).await;
    assert_eq!(x.request_decision, Decision::Continue);
    assert_eq!(hv(&x.request.headers, "x-wat"), Some("yes"));

    // A trapping allocator fails the callback that needed it.
    let wasm = module(
        "proxy_abi_version_0_2_1",
        r#"(func (export "malloc") (param i32) (result i32) unreachable)"#,
        r#"
        (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
          (drop (call $get_pairs (i32.const 0) (i32.const 2000) (i32.const 2004)))
          (i32.const 0))
        "#,
    );
    let p = load(wasm, "trap-malloc", "", FailPolicy::Closed, &TestEnv::new()).unwrap();
    let x = exchange(&p, request("/", &[])).await;
    assert!(
        matches!(x.request_decision, Decision::LocalReply(ref r) if r.details == "wasm_fail_stream")
    );
    assert_eq!(p.stats().traps, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trapping_start_function_is_an_instantiation_error() {
    let env = TestEnv::new();
    for _ in 0..2 {
        let wasm = module(
            "proxy_abi_version_0_2_1",
            BUMP_MALLOC,
            r#"(func (export "_initialize") unreachable)"#,
        );
        let e = load(wasm, "init-trap", "", FailPolicy::Closed, &env).unwrap_err();
        assert!(matches!(e, PluginError::Instantiate { .. }), "{e}");
        assert!(e.to_string().contains("init-trap"), "{e}");
    }
    // A start function exiting with a non-zero code fails too.
    let wasm = module(
        "proxy_abi_version_0_2_1",
        BUMP_MALLOC,
        r#"(func (export "_start") (call $proc_exit (i32.const 3)))"#,
    );
    let e = load(wasm, "exit-3", "", FailPolicy::Closed, &env).unwrap_err();
    assert!(e.to_string().contains("proc_exit(3)"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_memory_over_the_limit_fails_to_instantiate() {
    // 64 pages = 4 MiB initial memory against a 1 MiB cap.
    let wasm = wat::parse_str(
        r#"(module (memory (export "memory") 64)
             (func (export "proxy_abi_version_0_2_1"))
             (func (export "proxy_on_context_create") (param i32 i32)))"#,
    )
    .unwrap();
    let mut cfg = PluginConfig::new("big-memory", wasm);
    cfg.vm_id = "big-memory".into();
    cfg.limits.memory_bytes = 1 << 20;
    let e = Plugin::new(&engine(1), cfg, TestEnv::new()).unwrap_err();
    assert!(matches!(e, PluginError::Instantiate { .. }), "{e}");
}

#[test]
fn compile_cache_on_disk() {
    // Under target/ (Cargo's scratch directory for integration tests), not /tmp: wasmtime's
    // cache worker may write to the directory after the test has removed it.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("wasm-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let engine = weir_wasm_host::Engine::new(weir_wasm_host::EngineConfig {
        cache_dir: Some(dir.clone()),
        replicas: 1,
        ..Default::default()
    })
    .unwrap();
    let wasm = module("proxy_abi_version_0_2_1", BUMP_MALLOC, "");
    let mut cfg = PluginConfig::new("cached", wasm);
    cfg.vm_id = "cached".into();
    let p = Plugin::new(&engine, cfg, TestEnv::new()).unwrap();
    drop(p);
    drop(engine);
    let files = walk(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(files > 0, "the compile cache directory has artefacts");
}

fn walk(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() { walk(&p) } else { 1 }
                })
                .sum()
        })
        .unwrap_or(0)
}
