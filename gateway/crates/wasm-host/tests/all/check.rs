//! `check_module`.

use weir_wasm_host::{AbiVersion, check_module};

use crate::support::guest;

#[test]
fn sdk_guest_runs_on_weir_and_envoy() {
    let r = check_module(&guest("http")).unwrap();
    assert_eq!(r.abi, Some(AbiVersion::V0_2_1));
    assert!(r.runs_on_weir, "{r}");
    assert!(r.portable_to_envoy, "{r}");
    assert!(
        r.imports
            .iter()
            .any(|i| i.name == "proxy_http_call" || i.name == "proxy_log")
    );
    assert!(r.exports.iter().any(|e| e == "proxy_on_request_headers"));
}

#[test]
fn unknown_imports_and_missing_marker_are_reported() {
    let wasm = wat::parse_str(
        r#"(module
            (import "env" "proxy_frobnicate" (func (param i32) (result i32)))
            (memory (export "memory") 1))"#,
    )
    .unwrap();
    let r = check_module(&wasm).unwrap();
    assert_eq!(r.abi, None);
    assert!(!r.runs_on_weir);
    assert!(!r.portable_to_envoy);
    assert!(r.to_string().contains("[UNKNOWN]"));

    let wasm = wat::parse_str(
        r#"(module
            (import "env" "proxy_dispatch_http_call" (func (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "proxy_abi_version_0_2_0")))"#,
    )
    .unwrap();
    let r = check_module(&wasm).unwrap();
    assert!(r.runs_on_weir, "{r}");
    assert!(!r.portable_to_envoy, "Weir-only import");

    let wasm = wat::parse_str(
        r#"(module
            (import "env" "proxy_log" (func (param i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "proxy_abi_version_0_2_1")))"#,
    )
    .unwrap();
    let r = check_module(&wasm).unwrap();
    assert!(!r.runs_on_weir, "wrong signature: {r}");
    assert!(check_module(b"not wasm").is_err());
}
