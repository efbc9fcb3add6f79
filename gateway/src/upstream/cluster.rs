//! An upstream cluster: its endpoints (static or resolved by DNS), subsets, load balancer,
//! connection pool, circuit breakers, active health checks and outlier detection.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::connector::{ConnectionCounts, UpstreamConnector, UpstreamTls};
use super::endpoint::{Endpoint, now_ms};
use super::h2pool::H2Pool;
use super::lb::{Balancer, HashOn, Policy, Ring, hash_bytes};
use crate::body::ProxyBody;
use crate::telemetry::metrics::ClusterStats;
use crate::workers::PerWorker;

/// A configured endpoint address: an IP or a DNS name to resolve.
#[derive(Debug, Clone)]
pub struct EndpointSpec {
    /// `host` part.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Weight.
    pub weight: u32,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// A named subset: endpoints whose labels include all of these.
#[derive(Debug, Clone)]
pub struct SubsetSpec {
    /// Name.
    pub name: String,
    /// Required labels.
    pub labels: BTreeMap<String, String>,
}

/// Active health check settings.
#[derive(Debug, Clone)]
pub struct HealthCheckSpec {
    /// Path requested.
    pub path: String,
    /// Interval.
    pub interval: Duration,
    /// Timeout of one check.
    pub timeout: Duration,
    /// Successes to become healthy.
    pub healthy_threshold: u32,
    /// Failures to become unhealthy.
    pub unhealthy_threshold: u32,
}

/// Outlier detection settings.
#[derive(Debug, Clone)]
pub struct OutlierSpec {
    /// Consecutive 5xx to eject.
    pub consecutive_5xx: u32,
    /// Consecutive gateway errors to eject.
    pub consecutive_gateway_errors: u32,
    /// Base ejection time.
    pub base_ejection_time: Duration,
    /// Max percentage ejected at once.
    pub max_ejection_percent: u32,
}

/// Everything needed to build a cluster.
#[derive(Clone)]
pub struct ClusterSpec {
    /// Name.
    pub name: String,
    /// Endpoints as configured.
    pub endpoints: Vec<EndpointSpec>,
    /// Subsets.
    pub subsets: Vec<SubsetSpec>,
    /// Load-balancing policy.
    pub policy: Policy,
    /// Use HTTP/2 to the upstream.
    pub http2: bool,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Pool idle timeout.
    pub idle_timeout: Duration,
    /// Max idle connections per endpoint.
    pub max_idle_per_endpoint: usize,
    /// TLS.
    pub tls: Option<UpstreamTls>,
    /// DNS refresh interval.
    pub dns_refresh: Duration,
    /// Health checks.
    pub health_check: Option<HealthCheckSpec>,
    /// Outlier detection.
    pub outlier: Option<OutlierSpec>,
    /// Max connections.
    pub max_connections: usize,
    /// Max pending.
    pub max_pending_requests: usize,
    /// Max in-flight requests.
    pub max_requests: usize,
}

/// One group of endpoints (all endpoints, or a subset) with its hash ring.
#[derive(Debug, Default)]
pub struct Group {
    /// Endpoints in the group.
    pub endpoints: Vec<Arc<Endpoint>>,
    ring: Option<Ring>,
}

/// The current endpoints of a cluster; replaced as a whole when DNS answers change.
#[derive(Debug, Default)]
pub struct EndpointSet {
    /// Group 0 is every endpoint; group `i + 1` is subset `i`.
    pub groups: Vec<Group>,
}

/// A live cluster.
pub struct Cluster {
    /// Name.
    pub name: Arc<str>,
    spec: ClusterSpec,
    endpoints: ArcSwap<EndpointSet>,
    balancer: Balancer,
    /// The HTTP/1.1 connection pools, one per worker (as Envoy's), so a worker only reuses
    /// connections whose tasks run on its own thread.
    clients: PerWorker<Client<UpstreamConnector, ProxyBody>>,
    /// HTTP/2 connections per worker, when the cluster's protocol is `http2`.
    h2: Option<PerWorker<H2Pool>>,
    /// Connection counts.
    pub connections: Arc<ConnectionCounts>,
    /// Requests in flight.
    pub active_requests: AtomicUsize,
    /// Retries in flight (for the retry budget).
    pub active_retries: AtomicUsize,
    /// Statistics.
    pub stats: Arc<ClusterStats>,
    /// Fingerprint of the config this cluster was built from, to reuse it across reloads.
    pub fingerprint: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Hashing inputs for ring hash.
pub struct PickContext<'a> {
    /// Request headers.
    pub headers: &'a http::HeaderMap,
    /// Client IP.
    pub client_ip: std::net::IpAddr,
    /// A uniform random number.
    pub random: u64,
}

impl Cluster {
    /// Build a cluster with connection pools for `workers` workers and start its background
    /// tasks (DNS, health checks), which stop when the cluster is dropped.
    pub fn start(
        spec: ClusterSpec,
        stats: Arc<ClusterStats>,
        fingerprint: String,
        workers: usize,
    ) -> Arc<Cluster> {
        let connections = Arc::new(ConnectionCounts::default());
        let connector = UpstreamConnector {
            connect_timeout: spec.connect_timeout,
            tls: spec.tls.clone(),
            max_connections: spec.max_connections,
            max_pending: spec.max_pending_requests,
            counts: connections.clone(),
        };
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(spec.idle_timeout)
            .pool_max_idle_per_host(spec.max_idle_per_endpoint)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .set_host(false);
        let h2 = spec
            .http2
            .then(|| PerWorker::new(workers, || H2Pool::new(connector.clone())));
        let clients = PerWorker::new(workers, || builder.build(connector.clone()));
        let static_addrs: Option<Vec<Vec<SocketAddr>>> = spec
            .endpoints
            .iter()
            .map(|e| {
                e.host
                    .parse::<std::net::IpAddr>()
                    .ok()
                    .map(|ip| vec![SocketAddr::new(ip, e.port)])
            })
            .collect();
        let cluster = Arc::new(Cluster {
            name: spec.name.as_str().into(),
            balancer: Balancer::new(spec.policy.clone()),
            endpoints: ArcSwap::from_pointee(EndpointSet::default()),
            clients,
            h2,
            connections,
            active_requests: AtomicUsize::new(0),
            active_retries: AtomicUsize::new(0),
            stats,
            fingerprint,
            spec,
        });
        match static_addrs {
            Some(addrs) => cluster.set_endpoints(&addrs),
            None => {
                cluster.set_endpoints(&resolve_now(&cluster.spec.endpoints));
                tokio::spawn(dns_loop(Arc::downgrade(&cluster), cluster.spec.dns_refresh));
            }
        }
        if let Some(hc) = cluster.spec.health_check.clone() {
            tokio::spawn(health_loop(Arc::downgrade(&cluster), hc));
        }
        cluster
    }

    /// A connector to this cluster's endpoints for raw TCP connections (`tcp_proxy`): the
    /// cluster's connect timeout, TLS settings and connection circuit breakers, counted with
    /// its HTTP connections.
    pub fn connector(&self) -> UpstreamConnector {
        UpstreamConnector {
            connect_timeout: self.spec.connect_timeout,
            tls: self.spec.tls.clone(),
            max_connections: self.spec.max_connections,
            max_pending: self.spec.max_pending_requests,
            counts: self.connections.clone(),
        }
    }

    /// This thread's HTTP/1.1 connection pool.
    pub fn client(&self) -> &Client<UpstreamConnector, ProxyBody> {
        self.clients.get()
    }

    /// This thread's HTTP/2 connections, when the cluster's protocol is `http2`.
    pub fn h2(&self) -> Option<&H2Pool> {
        self.h2.as_ref().map(PerWorker::get)
    }

    /// The configuration it was built from.
    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    /// Index of a subset by name.
    pub fn subset_index(&self, name: &str) -> Option<usize> {
        self.spec.subsets.iter().position(|s| s.name == name)
    }

    /// Replace the endpoints with resolved addresses (`addrs[i]` for configured endpoint `i`),
    /// keeping the live state of endpoints that stay.
    fn set_endpoints(&self, addrs: &[Vec<SocketAddr>]) {
        let old = self.endpoints.load();
        let old_all: Vec<Arc<Endpoint>> = old
            .groups
            .first()
            .map(|g| g.endpoints.clone())
            .unwrap_or_default();
        let mut all = Vec::new();
        for (spec, resolved) in self.spec.endpoints.iter().zip(addrs) {
            for addr in resolved {
                let key = if spec.host.parse::<std::net::IpAddr>().is_ok() {
                    addr.to_string()
                } else {
                    format!("{}:{}/{}", spec.host, spec.port, addr.ip())
                };
                let ep = old_all
                    .iter()
                    .find(|e| e.key == key)
                    .cloned()
                    .unwrap_or_else(|| {
                        Arc::new(Endpoint::new(*addr, key, spec.weight, spec.labels.clone()))
                    });
                all.push(ep);
            }
        }
        let ring = matches!(self.spec.policy, Policy::RingHash(_));
        let make = |eps: Vec<Arc<Endpoint>>| Group {
            ring: ring.then(|| Ring::new(&eps)),
            endpoints: eps,
        };
        let mut groups = vec![];
        for subset in &self.spec.subsets {
            let members = all
                .iter()
                .filter(|e| {
                    subset
                        .labels
                        .iter()
                        .all(|(k, v)| e.labels.get(k) == Some(v))
                })
                .cloned()
                .collect();
            groups.push(make(members));
        }
        groups.insert(0, make(all));
        self.endpoints.store(Arc::new(EndpointSet { groups }));
    }

    /// The current endpoint set.
    pub fn endpoint_set(&self) -> arc_swap::Guard<Arc<EndpointSet>> {
        self.endpoints.load()
    }

    /// Pick an endpoint of `subset` (or of all endpoints) for a request. Unavailable endpoints
    /// (unhealthy or ejected) are skipped unless all are unavailable (Envoy's panic mode).
    pub fn pick(
        &self,
        subset: Option<usize>,
        ctx: &PickContext<'_>,
        exclude: Option<&Endpoint>,
    ) -> Option<Arc<Endpoint>> {
        let set = self.endpoints.load();
        let group = set.groups.get(subset.map_or(0, |s| s + 1))?;
        let eps = &group.endpoints;
        if eps.is_empty() {
            return None;
        }
        let now = now_ms();
        let usable =
            |e: &Endpoint| e.is_available(now) && exclude.is_none_or(|x| !std::ptr::eq(x, e));
        if let (Policy::RingHash(on), Some(ring)) = (self.balancer.policy(), &group.ring)
            && let Some(h) = request_hash(on, ctx)
        {
            let i = ring
                .lookup(h, |i| !usable(&eps[i]))
                .or_else(|| ring.lookup(h, |_| false))?;
            return Some(eps[i].clone());
        }
        if eps.iter().all(|e| usable(e)) {
            return Some(eps[self.balancer.pick(eps, ctx.random)].clone());
        }
        let available: Vec<Arc<Endpoint>> = eps.iter().filter(|e| usable(e)).cloned().collect();
        if available.is_empty() {
            // Panic mode: everything is unavailable, so use every endpoint.
            return Some(eps[self.balancer.pick(eps, ctx.random)].clone());
        }
        Some(available[self.balancer.pick(&available, ctx.random)].clone())
    }

    /// Record the outcome of a request to `ep` for outlier detection.
    pub fn record_outcome(&self, ep: &Endpoint, status_5xx: bool, gateway_error: bool) {
        let Some(od) = &self.spec.outlier else { return };
        let (c5, cg) = ep.record_outcome(status_5xx, gateway_error);
        let trip = (od.consecutive_5xx > 0 && c5 >= od.consecutive_5xx)
            || (od.consecutive_gateway_errors > 0 && cg >= od.consecutive_gateway_errors);
        if !trip {
            return;
        }
        let now = now_ms();
        let set = self.endpoints.load();
        let all = &set.groups[0].endpoints;
        let ejected = all.iter().filter(|e| e.is_ejected(now)).count();
        let max = (all.len() * od.max_ejection_percent as usize / 100).max(1);
        if ejected < max && !ep.is_ejected(now) {
            ep.eject(now, od.base_ejection_time.as_millis() as u64);
            self.stats.ejections.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(cluster = %self.name, endpoint = %ep.addr, "outlier detection ejected endpoint");
        }
    }
}

fn request_hash(on: &HashOn, ctx: &PickContext<'_>) -> Option<u64> {
    match on {
        HashOn::Header(name) => ctx.headers.get(name).map(|v| hash_bytes(v.as_bytes())),
        HashOn::SourceIp => Some(match ctx.client_ip {
            std::net::IpAddr::V4(ip) => hash_bytes(&ip.octets()),
            std::net::IpAddr::V6(ip) => hash_bytes(&ip.octets()),
        }),
        HashOn::Cookie(name) => ctx
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| hash_bytes(v.as_bytes())),
    }
}

fn resolve_now(specs: &[EndpointSpec]) -> Vec<Vec<SocketAddr>> {
    specs
        .iter()
        .map(|e| match e.host.parse::<std::net::IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, e.port)],
            Err(_) => {
                use std::net::ToSocketAddrs;
                let mut v: Vec<SocketAddr> = (e.host.as_str(), e.port)
                    .to_socket_addrs()
                    .map(Iterator::collect)
                    .unwrap_or_default();
                v.sort();
                v.dedup();
                v
            }
        })
        .collect()
}

async fn dns_loop(cluster: Weak<Cluster>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(c) = cluster.upgrade() else { return };
        let specs = c.spec.endpoints.clone();
        drop(c);
        let Ok(addrs) = tokio::task::spawn_blocking(move || resolve_now(&specs)).await else {
            return;
        };
        let Some(c) = cluster.upgrade() else { return };
        c.set_endpoints(&addrs);
    }
}

async fn health_loop(cluster: Weak<Cluster>, hc: HealthCheckSpec) {
    loop {
        let Some(c) = cluster.upgrade() else { return };
        let endpoints = c.endpoints.load().groups[0].endpoints.clone();
        let mut checks = Vec::with_capacity(endpoints.len());
        for ep in endpoints {
            let c = c.clone();
            let hc = hc.clone();
            checks.push(tokio::spawn(async move {
                let ok = check_once(&c, &ep, &hc).await;
                if let Some(state) = ep.record_health(ok, hc.healthy_threshold, hc.unhealthy_threshold) {
                    tracing::info!(cluster = %c.name, endpoint = %ep.addr, healthy = state, "health check verdict changed");
                }
            }));
        }
        drop(c);
        for check in checks {
            let _ = check.await;
        }
        tokio::time::sleep(hc.interval).await;
    }
}

/// One active health check: `GET path` with `Host: <cluster name>`, over the cluster's protocol
/// and TLS; healthy on a 2xx within the timeout.
async fn check_once(cluster: &Cluster, ep: &Endpoint, hc: &HealthCheckSpec) -> bool {
    let check = async {
        let req = |uri: String, version: http::Version| {
            http::Request::get(uri)
                .version(version)
                .header(http::header::USER_AGENT, "weir-health-check")
                .body(crate::body::empty())
                .ok()
        };
        let resp = match cluster.h2() {
            Some(pool) => {
                let scheme = if cluster.spec.tls.is_some() {
                    "https"
                } else {
                    "http"
                };
                let req = req(
                    format!("{scheme}://{}{}", cluster.name, hc.path),
                    http::Version::HTTP_2,
                )?;
                pool.sender(ep.addr)
                    .await
                    .ok()?
                    .send_request(req)
                    .await
                    .ok()?
            }
            None => {
                // The connector applies the cluster's TLS settings; the URI only carries the address.
                let mut req = req(
                    format!("http://{}{}", ep.authority, hc.path),
                    http::Version::HTTP_11,
                )?;
                let host = http::HeaderValue::from_str(&cluster.name).ok()?;
                req.headers_mut().insert(http::header::HOST, host);
                cluster.client().request(req).await.ok()?
            }
        };
        Some(resp.status().is_success())
    };
    matches!(
        tokio::time::timeout(hc.timeout, check).await,
        Ok(Some(true))
    )
}
