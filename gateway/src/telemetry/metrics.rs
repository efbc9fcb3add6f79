//! Counters and histograms, rendered as Prometheus text on the admin listener's `/metrics`.
//!
//! Every figure the request path touches is a plain atomic inside a stats object that the
//! compiled route or cluster holds directly, so recording takes no lock and no lookup. The
//! registry keeps stats by name across reloads (a route renamed starts from zero).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds of the duration histogram buckets, in seconds (Envoy-like spread).
pub const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A fixed-bucket histogram of durations.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; DURATION_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Record one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = DURATION_BUCKETS.partition_point(|&b| b < secs);
        if i < self.buckets.len() {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// Counts of responses by status code (100–599).
#[derive(Debug)]
pub struct CodeCounts([AtomicU64; 500]);

impl Default for CodeCounts {
    fn default() -> Self {
        CodeCounts(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl CodeCounts {
    /// Count one response.
    pub fn inc(&self, code: u16) {
        if let Some(c) = usize::from(code)
            .checked_sub(100)
            .and_then(|i| self.0.get(i))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Count of a code.
    pub fn get(&self, code: u16) -> u64 {
        self.0
            .get(usize::from(code.saturating_sub(100)))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    fn nonzero(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.0.iter().enumerate().filter_map(|(i, c)| {
            let v = c.load(Ordering::Relaxed);
            (v > 0).then_some((i as u16 + 100, v))
        })
    }
}

/// Per-route statistics.
#[derive(Debug, Default)]
pub struct RouteStats {
    /// Responses by code.
    pub codes: CodeCounts,
    /// Request durations (first byte in to last byte out).
    pub duration: Histogram,
    /// Requests rejected by the rate limiter.
    pub rate_limited: AtomicU64,
}

/// Per-cluster statistics.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Upstream responses by code.
    pub codes: CodeCounts,
    /// Upstream time to response headers.
    pub duration: Histogram,
    /// Retries.
    pub retries: AtomicU64,
    /// Requests failed fast by a circuit breaker.
    pub overflow: AtomicU64,
    /// Connect failures.
    pub connect_failures: AtomicU64,
    /// Attempts that timed out.
    pub timeouts: AtomicU64,
    /// Outlier ejections.
    pub ejections: AtomicU64,
}

/// Per-listener statistics of a `tcp` listener.
#[derive(Debug, Default)]
pub struct TcpStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections open now.
    pub active: AtomicU64,
    /// Bytes received from downstream clients.
    pub received_bytes: AtomicU64,
    /// Bytes sent to downstream clients.
    pub sent_bytes: AtomicU64,
    /// Connections closed because no upstream connection could be made.
    pub upstream_failures: AtomicU64,
}

/// Process-wide counters not tied to a route or cluster.
#[derive(Debug, Default)]
pub struct GlobalStats {
    /// Successful reloads.
    pub reloads: AtomicU64,
    /// Rejected reloads.
    pub reload_failures: AtomicU64,
    /// Requests that matched no route.
    pub no_route: AtomicU64,
    /// Downstream connections accepted.
    pub downstream_connections: AtomicU64,
    /// Downstream connections open now.
    pub downstream_connections_active: AtomicU64,
    /// Connections refused at the listener's limit.
    pub downstream_connections_overflow: AtomicU64,
    /// Malformed downstream requests (400s from the codec).
    pub downstream_protocol_errors: AtomicU64,
    /// Access log lines dropped because the writer fell behind.
    pub access_log_dropped: AtomicU64,
    /// Config version in force.
    pub config_version: AtomicU64,
}

/// The registry: stats by name, kept across reloads.
#[derive(Debug, Default)]
pub struct Registry {
    routes: Mutex<BTreeMap<String, Arc<RouteStats>>>,
    clusters: Mutex<BTreeMap<String, Arc<ClusterStats>>>,
    tcp: Mutex<BTreeMap<String, Arc<TcpStats>>>,
    workers: std::sync::OnceLock<Box<[WorkerStats]>>,
    /// Global counters.
    pub global: GlobalStats,
}

/// Connections of one worker thread, to see how evenly the workers share the load (Envoy's
/// `listener.*.worker_N.downstream_cx_*`).
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct WorkerStats {
    /// Downstream connections this worker accepted.
    pub connections: AtomicU64,
    /// Downstream connections open on this worker now.
    pub connections_active: AtomicU64,
}

impl Registry {
    /// Stats of a route (created on first use).
    pub fn route(&self, name: &str) -> Arc<RouteStats> {
        self.routes
            .lock()
            .expect("stats lock")
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Stats of a cluster (created on first use).
    pub fn cluster(&self, name: &str) -> Arc<ClusterStats> {
        self.clusters
            .lock()
            .expect("stats lock")
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Set the number of workers (once; later calls change nothing).
    pub fn set_workers(&self, count: usize) {
        self.workers
            .get_or_init(|| (0..count).map(|_| WorkerStats::default()).collect());
    }

    /// Stats of worker `index`.
    pub fn worker(&self, index: usize) -> Option<&WorkerStats> {
        self.workers.get().and_then(|w| w.get(index))
    }

    /// Stats of a `tcp` listener (created on first use).
    pub fn tcp(&self, listener: &str) -> Arc<TcpStats> {
        self.tcp
            .lock()
            .expect("stats lock")
            .entry(listener.to_string())
            .or_default()
            .clone()
    }

    /// Forget stats of `tcp` listeners no longer configured (open connections keep theirs).
    pub fn retain_tcp(&self, listeners: &[&str]) {
        self.tcp
            .lock()
            .expect("stats lock")
            .retain(|k, _| listeners.contains(&k.as_str()));
    }

    /// Forget stats of routes and clusters no longer configured.
    pub fn retain(&self, routes: &[&str], clusters: &[&str]) {
        self.routes
            .lock()
            .expect("stats lock")
            .retain(|k, _| routes.contains(&k.as_str()));
        self.clusters
            .lock()
            .expect("stats lock")
            .retain(|k, _| clusters.contains(&k.as_str()));
    }

    /// Render route, cluster and global figures in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let g = &self.global;
        let counters: [(&str, &str, &AtomicU64); 7] = [
            (
                "weir_config_reloads_total",
                "Successful config reloads.",
                &g.reloads,
            ),
            (
                "weir_config_reload_failures_total",
                "Rejected config reloads.",
                &g.reload_failures,
            ),
            (
                "weir_no_route_total",
                "Requests that matched no route (NR).",
                &g.no_route,
            ),
            (
                "weir_downstream_connections_total",
                "Downstream connections accepted.",
                &g.downstream_connections,
            ),
            (
                "weir_downstream_connections_overflow_total",
                "Connections refused at max_connections.",
                &g.downstream_connections_overflow,
            ),
            (
                "weir_downstream_protocol_errors_total",
                "Malformed downstream requests.",
                &g.downstream_protocol_errors,
            ),
            (
                "weir_access_log_dropped_total",
                "Access log lines dropped.",
                &g.access_log_dropped,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP weir_downstream_connections_active Open downstream connections.\n# TYPE weir_downstream_connections_active gauge\nweir_downstream_connections_active {}",
            g.downstream_connections_active.load(Ordering::Relaxed)
        );
        if let Some(workers) = self.workers.get() {
            type WorkerField = fn(&WorkerStats) -> &AtomicU64;
            let figures: [(&str, &str, &str, WorkerField); 2] = [
                (
                    "weir_worker_downstream_connections_total",
                    "counter",
                    "Downstream connections accepted, by worker thread.",
                    |w| &w.connections,
                ),
                (
                    "weir_worker_downstream_connections_active",
                    "gauge",
                    "Open downstream connections, by worker thread.",
                    |w| &w.connections_active,
                ),
            ];
            for (metric, kind, help, field) in figures {
                let by_worker = workers.iter().enumerate().map(|(i, w)| (i.to_string(), w));
                render_family(out, (metric, kind, help), "worker", by_worker, field);
            }
        }
        let _ = writeln!(
            out,
            "# HELP weir_config_version Version of the config in force.\n# TYPE weir_config_version gauge\nweir_config_version {}",
            g.config_version.load(Ordering::Relaxed)
        );

        let routes = self.routes.lock().expect("stats lock").clone();
        let _ = writeln!(
            out,
            "# HELP weir_route_requests_total Responses by route and status code.\n# TYPE weir_route_requests_total counter"
        );
        for (name, s) in &routes {
            for (code, n) in s.codes.nonzero() {
                let _ = writeln!(
                    out,
                    "weir_route_requests_total{{route=\"{}\",code=\"{code}\"}} {n}",
                    escape(name)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP weir_route_rate_limited_total Requests rejected by the rate limiter.\n# TYPE weir_route_rate_limited_total counter"
        );
        for (name, s) in &routes {
            let _ = writeln!(
                out,
                "weir_route_rate_limited_total{{route=\"{}\"}} {}",
                escape(name),
                s.rate_limited.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP weir_route_request_duration_seconds Request duration by route.\n# TYPE weir_route_request_duration_seconds histogram"
        );
        for (name, s) in &routes {
            s.duration.render(
                out,
                "weir_route_request_duration_seconds",
                &format!("route=\"{}\"", escape(name)),
            );
        }

        let clusters = self.clusters.lock().expect("stats lock").clone();
        let _ = writeln!(
            out,
            "# HELP weir_cluster_upstream_requests_total Upstream responses by cluster and status code.\n# TYPE weir_cluster_upstream_requests_total counter"
        );
        for (name, s) in &clusters {
            for (code, n) in s.codes.nonzero() {
                let _ = writeln!(
                    out,
                    "weir_cluster_upstream_requests_total{{cluster=\"{}\",code=\"{code}\"}} {n}",
                    escape(name)
                );
            }
        }
        type Field = fn(&ClusterStats) -> &AtomicU64;
        let cluster_counters: [(&str, &str, Field); 5] = [
            ("weir_cluster_retries_total", "Retries by cluster.", |s| {
                &s.retries
            }),
            (
                "weir_cluster_overflow_total",
                "Requests failed fast by a circuit breaker.",
                |s| &s.overflow,
            ),
            (
                "weir_cluster_connect_failures_total",
                "Upstream connect failures.",
                |s| &s.connect_failures,
            ),
            (
                "weir_cluster_timeouts_total",
                "Upstream attempts that timed out.",
                |s| &s.timeouts,
            ),
            (
                "weir_cluster_ejections_total",
                "Endpoints ejected by outlier detection.",
                |s| &s.ejections,
            ),
        ];
        for (metric, help, field) in cluster_counters {
            let by_name = clusters.iter().map(|(n, s)| (n, &**s));
            render_family(out, (metric, "counter", help), "cluster", by_name, field);
        }
        let _ = writeln!(
            out,
            "# HELP weir_cluster_upstream_duration_seconds Time to upstream response headers.\n# TYPE weir_cluster_upstream_duration_seconds histogram"
        );
        for (name, s) in &clusters {
            s.duration.render(
                out,
                "weir_cluster_upstream_duration_seconds",
                &format!("cluster=\"{}\"", escape(name)),
            );
        }

        let tcp = self.tcp.lock().expect("stats lock").clone();
        type TcpField = fn(&TcpStats) -> &AtomicU64;
        let tcp_figures: [(&str, &str, &str, TcpField); 5] = [
            (
                "weir_tcp_connections_total",
                "counter",
                "Connections accepted by tcp listener.",
                |s| &s.connections,
            ),
            (
                "weir_tcp_connections_active",
                "gauge",
                "Open connections by tcp listener.",
                |s| &s.active,
            ),
            (
                "weir_tcp_received_bytes_total",
                "counter",
                "Bytes received from downstream clients by tcp listener.",
                |s| &s.received_bytes,
            ),
            (
                "weir_tcp_sent_bytes_total",
                "counter",
                "Bytes sent to downstream clients by tcp listener.",
                |s| &s.sent_bytes,
            ),
            (
                "weir_tcp_upstream_failures_total",
                "counter",
                "Connections closed because no upstream connection could be made.",
                |s| &s.upstream_failures,
            ),
        ];
        for (metric, kind, help, field) in tcp_figures {
            let by_name = tcp.iter().map(|(n, s)| (n, &**s));
            render_family(out, (metric, kind, help), "listener", by_name, field);
        }
    }
}

/// One family of per-name figures: `# HELP`, `# TYPE` (`kind`), then `metric{label="NAME"}
/// value` for each of `stats`.
fn render_family<'a, T: 'a, K: AsRef<str>>(
    out: &mut String,
    (metric, kind, help): (&str, &str, &str),
    label: &str,
    stats: impl IntoIterator<Item = (K, &'a T)>,
    field: fn(&T) -> &AtomicU64,
) {
    let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
    for (name, s) in stats {
        let _ = writeln!(
            out,
            "{metric}{{{label}=\"{}\"}} {}",
            escape(name.as_ref()),
            field(s).load(Ordering::Relaxed)
        );
    }
}

/// Escape a Prometheus label value.
pub fn escape(v: &str) -> std::borrow::Cow<'_, str> {
    if v.contains(['\\', '"', '\n']) {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
            .into()
    } else {
        v.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.0005\"} 1\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.05\"} 2\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"10\"} 2\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"));
        assert!(out.contains("x_count{a=\"b\"} 3\n"));
    }

    #[test]
    fn codes() {
        let c = CodeCounts::default();
        c.inc(200);
        c.inc(200);
        c.inc(599);
        c.inc(42);
        assert_eq!(c.get(200), 2);
        assert_eq!(c.nonzero().collect::<Vec<_>>(), vec![(200, 2), (599, 1)]);
    }
}
