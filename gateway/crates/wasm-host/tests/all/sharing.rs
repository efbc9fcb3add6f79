//! VM sharing by vm_id, shared data across plugins, per-route configuration overrides.

use weir_wasm_host::{FailPolicy, PluginError};

use crate::support::{TestEnv, engine, exchange, hv, plugin, request, try_plugin};

fn hits(x: &crate::support::Exchange) -> u64 {
    hv(&x.request.headers, "x-hits").unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_with_the_same_vm_id_share_the_vm_and_its_data() {
    let env = TestEnv::new();
    let engine = engine(2);
    let a = plugin(&engine, &env, "http", "share-vm", "a", FailPolicy::Closed);
    let b = plugin(&engine, &env, "http", "share-vm", "b", FailPolicy::Closed);
    assert_eq!(
        a.stats().vm_starts,
        2,
        "two replicas started for the first plugin"
    );
    assert_eq!(
        b.stats().vm_starts,
        2,
        "the second plugin joined the running VMs"
    );
    let x = exchange(&a, request("/", &[])).await;
    assert_eq!(hits(&x), 1);
    assert_eq!(hv(&x.request.headers, "x-config"), Some("a"));
    let x = exchange(&b, request("/", &[])).await;
    assert_eq!(hits(&x), 2, "same vm_id: same shared data");
    assert_eq!(
        hv(&x.request.headers, "x-config"),
        Some("b"),
        "own root context"
    );
    let c = plugin(
        &engine,
        &env,
        "http",
        "share-vm-other",
        "",
        FailPolicy::Closed,
    );
    let x = exchange(&c, request("/", &[])).await;
    assert_eq!(hits(&x), 1, "another vm_id has its own shared data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_route_configuration_override() {
    let env = TestEnv::new();
    let p = plugin(
        &engine(2),
        &env,
        "http",
        "override",
        "base",
        FailPolicy::Closed,
    );
    let route = p
        .with_configuration(bytes::Bytes::from_static(b"route-b"))
        .unwrap();
    let x = exchange(&route, request("/", &[])).await;
    assert_eq!(hv(&x.request.headers, "x-config"), Some("route-b"));
    let x = exchange(&p, request("/", &[])).await;
    assert_eq!(hv(&x.request.headers, "x-config"), Some("base"));
    let e = p
        .with_configuration(bytes::Bytes::from_static(b"reject"))
        .unwrap_err();
    assert!(matches!(e, PluginError::ConfigureRejected { .. }), "{e}");
    // The base plugin still works after a rejected override.
    let x = exchange(&p, request("/", &[])).await;
    assert_eq!(hv(&x.request.headers, "x-config"), Some("base"));
    drop(route);
    let x = exchange(&p, request("/", &[])).await;
    assert_eq!(hv(&x.request.headers, "x-config"), Some("base"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_plugin_configuration_rejection_is_reported() {
    let env = TestEnv::new();
    let e = try_plugin(
        &engine(1),
        &env,
        "http",
        "reject-vm",
        "reject",
        FailPolicy::Closed,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("proxy_on_configure returned false"),
        "{e}"
    );
}
