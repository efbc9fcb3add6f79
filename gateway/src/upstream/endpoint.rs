//! One upstream endpoint and its live state: load, health, outlier ejection.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

/// An upstream endpoint.
#[derive(Debug)]
pub struct Endpoint {
    /// Resolved socket address.
    pub addr: SocketAddr,
    /// Stable identity (the configured address, plus the resolved IP for DNS endpoints).
    pub key: String,
    /// Load-balancing weight (≥ 1).
    pub weight: u32,
    /// Labels for subsets.
    pub labels: BTreeMap<String, String>,
    /// `addr` as a URI authority, precomputed for the request path.
    pub authority: http::uri::Authority,
    active: AtomicUsize,
    /// Active health check verdict (`true` when unchecked).
    healthy: AtomicBool,
    health_streak: AtomicU32,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Ejected until this many ms after `EPOCH`; 0 when not ejected.
    ejected_until_ms: AtomicU64,
    times_ejected: AtomicU32,
}

/// Decrements the endpoint's active request count when dropped.
pub struct ActiveGuard<'a>(&'a Endpoint);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a long-lived use of an endpoint (a proxied TCP connection) as a request in flight
/// until dropped, for the least-request balancer.
pub struct ActiveConnection(std::sync::Arc<Endpoint>);

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since the process-wide epoch (monotonic).
pub fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl Endpoint {
    /// A healthy, idle endpoint.
    pub fn new(
        addr: SocketAddr,
        key: String,
        weight: u32,
        labels: BTreeMap<String, String>,
    ) -> Endpoint {
        let authority = addr
            .to_string()
            .parse()
            .expect("a socket address is a valid authority");
        Endpoint {
            addr,
            key,
            weight: weight.max(1),
            labels,
            authority,
            active: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            health_streak: AtomicU32::new(0),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            times_ejected: AtomicU32::new(0),
        }
    }

    /// Requests in flight to this endpoint.
    pub fn active_requests(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Count a request in flight until the guard drops.
    pub fn start_request(&self) -> ActiveGuard<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self)
    }

    /// Count a connection in flight until the guard drops.
    pub fn start_connection(self: &std::sync::Arc<Self>) -> ActiveConnection {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveConnection(self.clone())
    }

    /// Whether active health checking considers it healthy.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether outlier detection has it ejected at `now` (ms).
    pub fn is_ejected(&self, now: u64) -> bool {
        now < self.ejected_until_ms.load(Ordering::Relaxed)
    }

    /// Whether it may receive traffic.
    pub fn is_available(&self, now: u64) -> bool {
        self.is_healthy() && !self.is_ejected(now)
    }

    /// Record a health-check result; returns `Some(new_state)` when the verdict changed.
    pub fn record_health(
        &self,
        ok: bool,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Option<bool> {
        let healthy = self.is_healthy();
        if ok == healthy {
            self.health_streak.store(0, Ordering::Relaxed);
            return None;
        }
        let streak = self.health_streak.fetch_add(1, Ordering::Relaxed) + 1;
        let threshold = if ok {
            healthy_threshold
        } else {
            unhealthy_threshold
        };
        if streak >= threshold.max(1) {
            self.healthy.store(ok, Ordering::Relaxed);
            self.health_streak.store(0, Ordering::Relaxed);
            return Some(ok);
        }
        None
    }

    /// Record a response for outlier detection. Returns the consecutive counts
    /// `(5xx, gateway errors)` after this response.
    pub fn record_outcome(&self, status_5xx: bool, gateway_error: bool) -> (u32, u32) {
        let c5 = if status_5xx || gateway_error {
            self.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.consecutive_5xx.store(0, Ordering::Relaxed);
            0
        };
        let cg = if gateway_error {
            self.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.consecutive_gateway.store(0, Ordering::Relaxed);
            0
        };
        (c5, cg)
    }

    /// Eject for `base_ms × times ejected` (Envoy's growing ejection time).
    pub fn eject(&self, now: u64, base_ms: u64) {
        let times = self.times_ejected.fetch_add(1, Ordering::Relaxed) + 1;
        self.ejected_until_ms
            .store(now + base_ms * u64::from(times.min(10)), Ordering::Relaxed);
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
    }

    /// Times ejected so far.
    pub fn times_ejected(&self) -> u32 {
        self.times_ejected.load(Ordering::Relaxed)
    }
}
