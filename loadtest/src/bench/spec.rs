//! The one proxy configuration every contender is given, in its own dialect: the same listener,
//! routes, upstreams, worker count and access-log setting.

use std::net::SocketAddr;
use std::path::PathBuf;

/// A backend of a route: an upstream address and its weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    /// Upstream address.
    pub addr: SocketAddr,
    /// Relative weight (all weights of a route add up to anything).
    pub weight: u32,
}

/// A route: requests whose host and path match go to the backends.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSpec {
    /// Exact host to match; `None` matches any host.
    pub host: Option<String>,
    /// Path prefix to match, starting and (unless `/`) ending with `/`.
    pub path_prefix: String,
    /// Weighted backends; one backend means no split.
    pub backends: Vec<Backend>,
}

/// TLS on the listener.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsSpec {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

/// Everything a contender's configuration expresses.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxySpec {
    /// Listener address.
    pub listen: SocketAddr,
    /// Admin / control address, for the contenders that have one (Weir, Caddy).
    pub admin: SocketAddr,
    /// TLS termination on the listener.
    pub tls: Option<TlsSpec>,
    /// Routes, matched in order.
    pub routes: Vec<RouteSpec>,
    /// Worker processes or threads.
    pub workers: usize,
    /// Access logs on (to a file in the work directory) or off, for all alike.
    pub access_log: bool,
    /// Idle keep-alive connections each contender keeps to the upstream.
    pub upstream_keepalive: usize,
    /// Client connections each contender must accept at once.
    pub max_connections: usize,
    /// Wasm filters for Weir (other contenders have no equivalent and are not run with filters).
    pub wasm_filters: Vec<WasmFilter>,
}

/// A proxy-wasm filter for Weir: a plugin and its place in the route's chain.
#[derive(Debug, Clone, PartialEq)]
pub struct WasmFilter {
    /// Plugin name.
    pub name: String,
    /// The module as Weir names it: `builtin:NAME` or a `.wasm` path.
    pub module: String,
    /// Plugin configuration (JSON text), if any.
    pub config: Option<String>,
}

impl ProxySpec {
    /// One catch-all route to `upstream`.
    pub fn simple(
        listen: SocketAddr,
        admin: SocketAddr,
        upstream: SocketAddr,
        workers: usize,
    ) -> Self {
        Self {
            listen,
            admin,
            tls: None,
            routes: vec![RouteSpec {
                host: None,
                path_prefix: "/".into(),
                backends: vec![Backend {
                    addr: upstream,
                    weight: 1,
                }],
            }],
            workers,
            access_log: false,
            upstream_keepalive: 128,
            max_connections: 20_000,
            wasm_filters: Vec::new(),
        }
    }

    /// Every distinct backend address, in first-seen order (one upstream cluster each).
    pub fn upstreams(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for b in self.routes.iter().flat_map(|r| &r.backends) {
            if !out.contains(&b.addr) {
                out.push(b.addr);
            }
        }
        out
    }

    /// The index of `addr` in [`Self::upstreams`], used for cluster names (`up0`, `up1`, ...).
    pub fn upstream_index(&self, addr: SocketAddr) -> usize {
        self.upstreams()
            .iter()
            .position(|a| *a == addr)
            .unwrap_or(0)
    }
}

/// `n` routes `svcI.example.com` + `/svcI/` (I = 0..n), all to `upstream`, and the requests that
/// hit every one of them in turn (the targets-file lines).
pub fn many_routes(n: usize, upstream: SocketAddr) -> (Vec<RouteSpec>, Vec<(String, String)>) {
    let routes = (0..n)
        .map(|i| RouteSpec {
            host: Some(format!("svc{i}.example.com")),
            path_prefix: format!("/svc{i}/"),
            backends: vec![Backend {
                addr: upstream,
                weight: 1,
            }],
        })
        .collect();
    // Visit the routes in a scattered order so that no contender benefits from locality.
    let targets = (0..n)
        .map(|k| (k * 7919) % n)
        .map(|i| (format!("svc{i}.example.com"), format!("/svc{i}/item")))
        .collect();
    (routes, targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_are_deduplicated_in_order() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let mut spec = ProxySpec::simple(
            "127.0.0.1:3".parse().unwrap(),
            "127.0.0.1:4".parse().unwrap(),
            a,
            2,
        );
        spec.routes.push(RouteSpec {
            host: None,
            path_prefix: "/x/".into(),
            backends: vec![
                Backend { addr: b, weight: 1 },
                Backend { addr: a, weight: 1 },
            ],
        });
        assert_eq!(spec.upstreams(), vec![a, b]);
        assert_eq!(spec.upstream_index(b), 1);
    }

    #[test]
    fn many_routes_cover_each_route_once() {
        let up: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let (routes, targets) = many_routes(1000, up);
        assert_eq!(routes.len(), 1000);
        let mut hosts: Vec<&str> = targets.iter().map(|(h, _)| h.as_str()).collect();
        hosts.sort_unstable();
        hosts.dedup();
        assert_eq!(hosts.len(), 1000);
        assert!(
            targets
                .iter()
                .all(|(h, p)| p.starts_with(&format!("/{}/", h.trim_end_matches(".example.com"))))
        );
    }
}
