//! Configuration files for the peers (nginx, HAProxy, Caddy, Traefik), each expressing the same
//! [`ProxySpec`]: keep-alive to the upstream, worker count = `spec.workers`, access logs as the
//! spec says, and limits high enough for 10,000 idle clients.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use super::spec::{Backend, ProxySpec, RouteSpec};

/// Keep-alive timeout given to every contender, client and upstream side, in seconds.
pub const KEEPALIVE_S: u32 = 120;

/// A name for a backend set, shared by the routes that use the same one.
fn backend_sets(spec: &ProxySpec) -> Vec<Vec<Backend>> {
    let mut sets: Vec<Vec<Backend>> = Vec::new();
    for r in &spec.routes {
        if !sets.contains(&r.backends) {
            sets.push(r.backends.clone());
        }
    }
    sets
}

fn set_index(sets: &[Vec<Backend>], route: &RouteSpec) -> usize {
    sets.iter().position(|s| *s == route.backends).unwrap_or(0)
}

/// `nginx.conf`, with every path under `dir`; run as `nginx -p DIR -c DIR/nginx.conf`.
pub fn nginx(spec: &ProxySpec, dir: &Path) -> String {
    let d = dir.display();
    let mut c = String::new();
    let _ = writeln!(c, "worker_processes {};", spec.workers);
    let _ = writeln!(c, "worker_rlimit_nofile {};", super::process::nofile());
    let _ = writeln!(
        c,
        "pid {d}/nginx.pid;\nerror_log {d}/nginx-error.log error;\ndaemon off;"
    );
    let _ = writeln!(
        c,
        "events {{ worker_connections {}; }}",
        spec.max_connections
    );
    c.push_str("http {\n");
    if spec.access_log {
        let _ = writeln!(c, "  access_log {d}/access.log;");
    } else {
        c.push_str("  access_log off;\n");
    }
    let _ = writeln!(
        c,
        "  keepalive_timeout {KEEPALIVE_S}s;\n  keepalive_requests 1000000;"
    );
    c.push_str("  server_names_hash_bucket_size 128;\n  server_names_hash_max_size 16384;\n");
    for t in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        let _ = writeln!(c, "  {t}_temp_path {d}/nginx-tmp-{t};");
    }
    let sets = backend_sets(spec);
    for (i, set) in sets.iter().enumerate() {
        let _ = writeln!(c, "  upstream set{i} {{");
        for b in set {
            let _ = writeln!(c, "    server {} weight={};", b.addr, b.weight);
        }
        let _ = writeln!(
            c,
            "    keepalive {};\n    keepalive_requests 1000000;\n    keepalive_timeout {KEEPALIVE_S}s;\n  }}",
            spec.upstream_keepalive
        );
    }
    // One server block per host, in first-seen order; `None` is the default server.
    let mut hosts: Vec<Option<&str>> = Vec::new();
    for r in &spec.routes {
        if !hosts.contains(&r.host.as_deref()) {
            hosts.push(r.host.as_deref());
        }
    }
    if !hosts.contains(&None) {
        hosts.push(None);
    }
    let listen = match &spec.tls {
        Some(_) => format!("{} ssl http2", spec.listen),
        None => spec.listen.to_string(),
    };
    for host in hosts {
        c.push_str("  server {\n");
        match host {
            None => {
                let _ = writeln!(
                    c,
                    "    listen {listen} default_server backlog=4096;\n    server_name _;"
                );
            }
            Some(h) => {
                let _ = writeln!(c, "    listen {listen};\n    server_name {h};");
            }
        }
        if let Some(tls) = &spec.tls {
            let _ = writeln!(
                c,
                "    ssl_certificate {};\n    ssl_certificate_key {};",
                tls.cert.display(),
                tls.key.display()
            );
        }
        let mut any = false;
        for r in spec.routes.iter().filter(|r| r.host.as_deref() == host) {
            any = true;
            let _ = writeln!(
                c,
                "    location {} {{\n      proxy_pass http://set{};\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n    }}",
                r.path_prefix,
                set_index(&sets, r)
            );
        }
        if !any {
            c.push_str("    location / { return 404; }\n");
        }
        c.push_str("  }\n");
    }
    c.push_str("}\n");
    c
}

/// `haproxy.cfg`; `pem` is the certificate and key concatenated (HAProxy's `crt` format).
pub fn haproxy(spec: &ProxySpec, pem: Option<&Path>) -> String {
    let mut c = String::new();
    // `no strict-limits`: HAProxy wants two descriptors per connection and refuses to start
    // when it cannot raise its limit that far; idle clients need one each, so run with what
    // the machine allows, as the other contenders do.
    let _ = writeln!(
        c,
        "global\n  nbthread {}\n  maxconn {}\n  no strict-limits",
        spec.workers, spec.max_connections
    );
    let _ = writeln!(
        c,
        "defaults\n  mode http\n  timeout connect 5s\n  timeout client {KEEPALIVE_S}s\n  timeout server {KEEPALIVE_S}s\n  timeout http-keep-alive {KEEPALIVE_S}s\n  option http-keep-alive"
    );
    if spec.access_log {
        c.push_str("  log stdout format raw local0\n  option httplog\n");
    }
    c.push_str("frontend fe\n");
    match (&spec.tls, pem) {
        (Some(_), Some(pem)) => {
            let _ = writeln!(
                c,
                "  bind {} ssl crt {} alpn h2,http/1.1",
                spec.listen,
                pem.display()
            );
        }
        _ => {
            let _ = writeln!(c, "  bind {}", spec.listen);
        }
    }
    let _ = writeln!(c, "  maxconn {}", spec.max_connections);
    if spec.access_log {
        c.push_str("  log global\n");
    }
    let sets = backend_sets(spec);
    let mut default = None;
    for r in &spec.routes {
        let set = set_index(&sets, r);
        match (&r.host, r.path_prefix.as_str()) {
            (None, "/") => {
                default.get_or_insert(set);
            }
            (None, p) => {
                let _ = writeln!(c, "  use_backend set{set} if {{ path_beg {p} }}");
            }
            (Some(h), p) => {
                let _ = writeln!(
                    c,
                    "  use_backend set{set} if {{ req.hdr(host),field(1,:) -i {h} }} {{ path_beg {p} }}"
                );
            }
        }
    }
    if let Some(set) = default {
        let _ = writeln!(c, "  default_backend set{set}");
    }
    for (i, set) in sets.iter().enumerate() {
        let _ = writeln!(c, "backend set{i}\n  balance roundrobin\n  http-reuse safe");
        for (k, b) in set.iter().enumerate() {
            let _ = writeln!(c, "  server s{k} {} weight {}", b.addr, b.weight);
        }
    }
    c
}

fn caddy_proxy(set: &[Backend], keepalive: usize) -> String {
    let addrs: Vec<String> = set.iter().map(|b| b.addr.to_string()).collect();
    let mut p = format!("reverse_proxy {} {{\n", addrs.join(" "));
    if set.len() > 1 {
        let weights: Vec<String> = set.iter().map(|b| b.weight.to_string()).collect();
        let _ = writeln!(
            p,
            "\t\t\tlb_policy weighted_round_robin {}",
            weights.join(" ")
        );
    }
    let _ = writeln!(
        p,
        "\t\t\ttransport http {{\n\t\t\t\tkeepalive {KEEPALIVE_S}s\n\t\t\t\tkeepalive_idle_conns {keepalive}\n\t\t\t\tkeepalive_idle_conns_per_host {keepalive}\n\t\t\t}}\n\t\t}}"
    );
    p
}

/// A `Caddyfile`; run as `caddy run --config FILE --adapter caddyfile` with `GOMAXPROCS=workers`.
pub fn caddy(spec: &ProxySpec, dir: &Path) -> String {
    let mut c = String::new();
    let _ = writeln!(
        c,
        "{{\n\tadmin {}\n\tauto_https off\n\tpersist_config off\n\tservers {{\n\t\tprotocols h1 h2\n\t}}\n}}",
        spec.admin
    );
    let scheme = if spec.tls.is_some() { "https" } else { "http" };
    let _ = writeln!(
        c,
        "{scheme}://:{} {{\n\tbind {}",
        spec.listen.port(),
        spec.listen.ip()
    );
    if let Some(tls) = &spec.tls {
        let _ = writeln!(c, "\ttls {} {}", tls.cert.display(), tls.key.display());
    }
    if spec.access_log {
        let _ = writeln!(
            c,
            "\tlog {{\n\t\toutput file {}/access.log\n\t}}",
            dir.display()
        );
    }
    let mut catch_all = None;
    for (i, r) in spec.routes.iter().enumerate() {
        let proxy = caddy_proxy(&r.backends, spec.upstream_keepalive);
        match (&r.host, r.path_prefix.as_str()) {
            (None, "/") => {
                catch_all.get_or_insert(proxy);
            }
            (host, prefix) => {
                let _ = writeln!(c, "\t@r{i} {{");
                if let Some(h) = host {
                    let _ = writeln!(c, "\t\thost {h}");
                }
                let _ = writeln!(
                    c,
                    "\t\tpath {prefix}*\n\t}}\n\thandle @r{i} {{\n\t\t{proxy}\n\t}}"
                );
            }
        }
    }
    match catch_all {
        Some(proxy) => {
            let _ = writeln!(c, "\thandle {{\n\t\t{proxy}\n\t}}");
        }
        None => c.push_str("\thandle {\n\t\trespond 404\n\t}\n"),
    }
    c.push_str("}\n");
    c
}

/// Traefik's static configuration (`traefik.yml`) and dynamic one (`dynamic.yml`, watched, so
/// that rewriting it reloads the routes). Run as `traefik --configFile=traefik.yml` with
/// `GOMAXPROCS=workers`.
pub fn traefik(spec: &ProxySpec, dir: &Path) -> (String, String) {
    let d = dir.display();
    let mut st = String::new();
    st.push_str("global:\n  checkNewVersion: false\n  sendAnonymousUsage: false\n");
    let _ = writeln!(
        st,
        "entryPoints:\n  web:\n    address: \"{}\"\n    transport:\n      respondingTimeouts:\n        idleTimeout: {KEEPALIVE_S}s",
        spec.listen
    );
    let _ = writeln!(
        st,
        "providers:\n  file:\n    filename: \"{d}/dynamic.yml\"\n    watch: true"
    );
    st.push_str("log:\n  level: ERROR\n");
    if spec.access_log {
        let _ = writeln!(st, "accessLog:\n  filePath: \"{d}/access.log\"");
    }
    let _ = writeln!(
        st,
        "serversTransport:\n  maxIdleConnsPerHost: {}",
        spec.upstream_keepalive
    );

    let mut dy = String::from("http:\n  routers:\n");
    let sets = backend_sets(spec);
    for (i, r) in spec.routes.iter().enumerate() {
        let path = format!("PathPrefix(`{}`)", r.path_prefix);
        let rule = match &r.host {
            Some(h) => format!("Host(`{h}`) && {path}"),
            None => path,
        };
        let tls = if spec.tls.is_some() {
            "\n      tls: {}"
        } else {
            ""
        };
        let _ = writeln!(
            dy,
            "    r{i}:\n      entryPoints: [web]\n      rule: \"{rule}\"\n      service: set{}{tls}",
            set_index(&sets, r)
        );
    }
    dy.push_str("  services:\n");
    let mut singles: Vec<SocketAddr> = Vec::new();
    for (i, set) in sets.iter().enumerate() {
        if let [only] = set.as_slice() {
            let _ = writeln!(
                dy,
                "    set{i}:\n      loadBalancer:\n        servers:\n          - url: \"http://{}\"",
                only.addr
            );
        } else {
            let _ = writeln!(dy, "    set{i}:\n      weighted:\n        services:");
            for b in set {
                let _ = writeln!(
                    dy,
                    "          - name: addr{}\n            weight: {}",
                    b.addr.port(),
                    b.weight
                );
                if !singles.contains(&b.addr) {
                    singles.push(b.addr);
                }
            }
        }
    }
    for a in singles {
        let _ = writeln!(
            dy,
            "    addr{}:\n      loadBalancer:\n        servers:\n          - url: \"http://{a}\"",
            a.port()
        );
    }
    if let Some(tls) = &spec.tls {
        let _ = writeln!(
            dy,
            "tls:\n  stores:\n    default:\n      defaultCertificate:\n        certFile: \"{}\"\n        keyFile: \"{}\"",
            tls.cert.display(),
            tls.key.display()
        );
    }
    (st, dy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::spec::{TlsSpec, many_routes};

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn canary() -> ProxySpec {
        let mut s = ProxySpec::simple(addr(8080), addr(9901), addr(5678), 2);
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
        s
    }

    #[test]
    fn nginx_simple_and_canary() {
        let dir = Path::new("/w");
        let c = nginx(
            &ProxySpec::simple(addr(8080), addr(9901), addr(5678), 2),
            dir,
        );
        assert!(c.contains("worker_processes 2;"));
        assert!(c.contains("access_log off;"));
        assert!(c.contains("listen 127.0.0.1:8080 default_server"));
        assert!(c.contains("server 127.0.0.1:5678 weight=1;"));
        assert!(c.contains("keepalive 128;"));
        assert!(c.contains("proxy_pass http://set0;"));
        assert_eq!(c.matches('{').count(), c.matches('}').count());
        let c = nginx(&canary(), dir);
        assert!(
            c.contains("server 127.0.0.1:5678 weight=90;")
                && c.contains("server 127.0.0.1:5679 weight=10;")
        );
    }

    #[test]
    fn nginx_tls_and_many_hosts() {
        let mut s = ProxySpec::simple(addr(8443), addr(9901), addr(5678), 2);
        s.tls = Some(TlsSpec {
            cert: "/c.pem".into(),
            key: "/k.pem".into(),
        });
        s.routes = many_routes(3, addr(5678)).0;
        s.access_log = true;
        let c = nginx(&s, Path::new("/w"));
        assert!(c.contains("listen 127.0.0.1:8443 ssl http2 default_server"));
        assert_eq!(c.matches("server_name svc").count(), 3);
        assert_eq!(c.matches("ssl_certificate /c.pem;").count(), 4);
        assert!(c.contains("location /svc2/ {"));
        assert!(c.contains("access_log /w/access.log;"));
        assert_eq!(
            c.matches("upstream set").count(),
            1,
            "one upstream block for one backend set"
        );
    }

    #[test]
    fn haproxy_routes_and_weights() {
        let c = haproxy(&canary(), None);
        assert!(c.contains("nbthread 2"));
        assert!(c.contains("bind 127.0.0.1:8080\n"));
        assert!(c.contains("default_backend set0"));
        assert!(
            c.contains("server s0 127.0.0.1:5678 weight 90")
                && c.contains("server s1 127.0.0.1:5679 weight 10")
        );
        let mut s = ProxySpec::simple(addr(8443), addr(9901), addr(5678), 2);
        s.tls = Some(TlsSpec {
            cert: "/c.pem".into(),
            key: "/k.pem".into(),
        });
        s.routes = many_routes(2, addr(5678)).0;
        let c = haproxy(&s, Some(Path::new("/w/both.pem")));
        assert!(c.contains("bind 127.0.0.1:8443 ssl crt /w/both.pem alpn h2,http/1.1"));
        assert!(c.contains("use_backend set0 if { req.hdr(host),field(1,:) -i svc1.example.com } { path_beg /svc1/ }"));
        assert!(!c.contains("default_backend"));
    }

    #[test]
    fn caddy_routes_weights_and_tls() {
        let c = caddy(&canary(), Path::new("/w"));
        assert!(c.contains("admin 127.0.0.1:9901"));
        assert!(c.contains("http://:8080 {\n\tbind 127.0.0.1"));
        assert!(c.contains("reverse_proxy 127.0.0.1:5678 127.0.0.1:5679 {"));
        assert!(c.contains("lb_policy weighted_round_robin 90 10"));
        assert_eq!(c.matches('{').count(), c.matches('}').count());
        let mut s = ProxySpec::simple(addr(8443), addr(9901), addr(5678), 2);
        s.tls = Some(TlsSpec {
            cert: "/c.pem".into(),
            key: "/k.pem".into(),
        });
        s.routes = many_routes(2, addr(5678)).0;
        let c = caddy(&s, Path::new("/w"));
        assert!(c.contains("https://:8443 {") && c.contains("tls /c.pem /k.pem"));
        assert!(
            c.contains("@r1 {\n\t\thost svc1.example.com\n\t\tpath /svc1/*\n\t}\n\thandle @r1 {")
        );
        assert!(c.contains("respond 404"));
        assert_eq!(c.matches('{').count(), c.matches('}').count());
    }

    #[test]
    fn traefik_routes_weights_and_tls() {
        let (st, dy) = traefik(&canary(), Path::new("/w"));
        assert!(st.contains("address: \"127.0.0.1:8080\""));
        assert!(st.contains("filename: \"/w/dynamic.yml\""));
        assert!(!st.contains("accessLog"));
        assert!(dy.contains("rule: \"PathPrefix(`/`)\""));
        assert!(dy.contains("weighted:") && dy.contains("name: addr5678\n            weight: 90"));
        assert!(dy.contains("addr5679:\n      loadBalancer:"));
        let mut s = ProxySpec::simple(addr(8443), addr(9901), addr(5678), 2);
        s.tls = Some(TlsSpec {
            cert: "/c.pem".into(),
            key: "/k.pem".into(),
        });
        s.routes = many_routes(2, addr(5678)).0;
        let (_, dy) = traefik(&s, Path::new("/w"));
        assert!(dy.contains("rule: \"Host(`svc0.example.com`) && PathPrefix(`/svc0/`)\""));
        assert!(dy.contains("tls: {}"));
        assert!(dy.contains("certFile: \"/c.pem\""));
    }
}
