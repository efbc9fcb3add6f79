//! Weir's configuration for a [`ProxySpec`]. Kept in this one module so that it follows Weir's
//! schema (`gateway/`, `configs/`) in one place when that changes.

use std::fmt::Write as _;

use super::peers::KEEPALIVE_S;
use super::spec::ProxySpec;

/// `weir.yaml` for `spec`; run as `weir run FILE --workers N`.
pub fn config(spec: &ProxySpec) -> String {
    let mut c = String::new();
    let _ = writeln!(c, "admin: {{ address: \"{}\" }}", spec.admin);
    let _ = writeln!(c, "access_log: {{ enabled: {} }}", spec.access_log);
    let _ = writeln!(
        c,
        "listeners:\n  - name: public\n    address: \"{}\"",
        spec.listen
    );
    let _ = writeln!(
        c,
        "    limits: {{ idle_timeout: {}s, max_connections: {} }}",
        KEEPALIVE_S, spec.max_connections
    );
    if let Some(tls) = &spec.tls {
        let _ = writeln!(
            c,
            "    tls: {{ certificates: [ {{ cert: \"{}\", key: \"{}\" }} ] }}",
            tls.cert.display(),
            tls.key.display()
        );
    }
    c.push_str("routes:\n");
    for (i, r) in spec.routes.iter().enumerate() {
        let host = r.host.as_deref().unwrap_or("*");
        let backends: Vec<String> = r
            .backends
            .iter()
            .map(|b| {
                format!(
                    "{{ cluster: up{}, weight: {} }}",
                    spec.upstream_index(b.addr),
                    b.weight
                )
            })
            .collect();
        let _ = writeln!(
            c,
            "  - name: r{i}\n    hosts: [\"{host}\"]\n    match: {{ path: {{ prefix: \"{}\" }} }}\n    backends: [ {} ]",
            r.path_prefix,
            backends.join(", ")
        );
        if !spec.wasm_filters.is_empty() {
            let names: Vec<&str> = spec.wasm_filters.iter().map(|f| f.name.as_str()).collect();
            let _ = writeln!(c, "    filters: [ {} ]", names.join(", "));
        }
    }
    if !spec.wasm_filters.is_empty() {
        c.push_str("plugins:\n");
        for f in &spec.wasm_filters {
            let _ = write!(c, "  - {{ name: {}, module: \"{}\"", f.name, f.module);
            if let Some(config) = &f.config {
                let _ = write!(c, ", config: {config}");
            }
            c.push_str(" }\n");
        }
    }
    c.push_str("clusters:\n");
    for (i, a) in spec.upstreams().iter().enumerate() {
        let _ = writeln!(
            c,
            "  - name: up{i}\n    endpoints: [ {{ address: \"{a}\" }} ]\n    idle_timeout: {KEEPALIVE_S}s\n    max_idle_per_endpoint: {}",
            spec.upstream_keepalive
        );
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::spec::{Backend, TlsSpec};
    use std::net::SocketAddr;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn simple_config() {
        let c = config(&ProxySpec::simple(addr(8080), addr(9901), addr(5678), 2));
        assert_eq!(
            c,
            "admin: { address: \"127.0.0.1:9901\" }\naccess_log: { enabled: false }\nlisteners:\n  - name: public\n    address: \"127.0.0.1:8080\"\n\
             \x20   limits: { idle_timeout: 120s, max_connections: 20000 }\n\
             routes:\n  - name: r0\n    hosts: [\"*\"]\n    match: { path: { prefix: \"/\" } }\n    backends: [ { cluster: up0, weight: 1 } ]\n\
             clusters:\n  - name: up0\n    endpoints: [ { address: \"127.0.0.1:5678\" } ]\n    idle_timeout: 120s\n    max_idle_per_endpoint: 128\n"
        );
    }

    #[test]
    fn filters_become_plugins_and_a_chain() {
        use crate::bench::spec::WasmFilter;
        let mut s = ProxySpec::simple(addr(8080), addr(9901), addr(5678), 2);
        s.wasm_filters = vec![
            WasmFilter {
                name: "noop".into(),
                module: "builtin:noop".into(),
                config: None,
            },
            WasmFilter {
                name: "rl".into(),
                module: "/f/rl.wasm".into(),
                config: Some("{\"rps\": 10}".into()),
            },
        ];
        let c = config(&s);
        assert!(
            c.contains(
                "    backends: [ { cluster: up0, weight: 1 } ]\n    filters: [ noop, rl ]\n"
            ),
            "{c}"
        );
        assert!(c.contains("plugins:\n  - { name: noop, module: \"builtin:noop\" }\n  - { name: rl, module: \"/f/rl.wasm\", config: {\"rps\": 10} }\n"), "{c}");
    }

    #[test]
    fn canary_and_tls() {
        let mut s = ProxySpec::simple(addr(8443), addr(9901), addr(5678), 2);
        s.routes[0].backends = vec![
            Backend {
                addr: addr(5678),
                weight: 90,
            },
            Backend {
                addr: addr(5679),
                weight: 10,
            },
        ];
        s.tls = Some(TlsSpec {
            cert: "/c.pem".into(),
            key: "/k.pem".into(),
        });
        let c = config(&s);
        assert!(
            c.contains("backends: [ { cluster: up0, weight: 90 }, { cluster: up1, weight: 10 } ]")
        );
        assert!(c.contains("tls: { certificates: [ { cert: \"/c.pem\", key: \"/k.pem\" } ] }"));
        assert!(c.contains("  - name: up1\n    endpoints: [ { address: \"127.0.0.1:5679\" } ]\n"));
    }
}
