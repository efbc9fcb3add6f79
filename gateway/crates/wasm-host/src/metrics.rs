//! Metrics defined by filters (`proxy_define_metric`) and the host's own per-plugin stats.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use crate::types::Status;

/// Kind of a filter-defined metric (the low 2 bits of its id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricKind {
    /// 0: monotonically increasing.
    Counter,
    /// 1: set or moved up and down.
    Gauge,
    /// 2: recorded values in buckets.
    Histogram,
}

impl MetricKind {
    fn from_i32(v: i32) -> Option<Self> {
        Some(match v {
            0 => Self::Counter,
            1 => Self::Gauge,
            2 => Self::Histogram,
            _ => return None,
        })
    }

    fn bits(self) -> u32 {
        match self {
            Self::Counter => 0,
            Self::Gauge => 1,
            Self::Histogram => 2,
        }
    }
}

/// Upper bounds of histogram buckets: 1, 2, 5, 10, 20, 50, ... up to 5e9.
const BOUNDS: [u64; 30] = {
    let mut b = [0u64; 30];
    let mut i = 0;
    let mut decade = 1u64;
    while i < 30 {
        b[i] = decade;
        b[i + 1] = decade * 2;
        b[i + 2] = decade * 5;
        decade *= 10;
        i += 3;
    }
    b
};

/// A lock-free histogram with fixed 1-2-5 buckets.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; 31],
    sum: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Record one value.
    pub fn record(&self, v: u64) {
        let idx = BOUNDS.iter().position(|&b| v <= b).unwrap_or(BOUNDS.len());
        self.buckets[idx].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(v, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Cumulative `(upper bound, count)` pairs (the last bound is `u64::MAX` for +Inf), the sum
    /// and the count.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(BOUNDS.len() + 1);
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            buckets.push((BOUNDS.get(i).copied().unwrap_or(u64::MAX), cumulative));
        }
        HistogramSnapshot {
            buckets,
            sum: self.sum.load(Ordering::Relaxed),
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

/// A point-in-time copy of a [`Histogram`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Cumulative `(upper bound, count)`; `u64::MAX` stands for +Inf.
    pub buckets: Vec<(u64, u64)>,
    /// Sum of recorded values.
    pub sum: u64,
    /// Number of recorded values.
    pub count: u64,
}

impl HistogramSnapshot {
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (le, n) in &self.buckets {
            if *le == u64::MAX {
                let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {n}");
            } else {
                let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {n}");
            }
        }
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

struct Metric {
    name: String,
    kind: MetricKind,
    value: AtomicI64,
    histogram: Histogram,
}

#[derive(Default)]
struct Registry {
    metrics: Vec<Arc<Metric>>,
    by_name: HashMap<(MetricKind, String), u32>,
}

fn registry() -> &'static RwLock<Registry> {
    static REG: OnceLock<RwLock<Registry>> = OnceLock::new();
    REG.get_or_init(Default::default)
}

/// Define (or find) a metric; the id carries the kind in its low 2 bits.
pub(crate) fn define(kind: i32, name: &str) -> Result<u32, Status> {
    let kind = MetricKind::from_i32(kind).ok_or(Status::BadArgument)?;
    if name.is_empty() {
        return Err(Status::BadArgument);
    }
    let mut reg = registry().write().unwrap_or_else(|e| e.into_inner());
    if let Some(&id) = reg.by_name.get(&(kind, name.to_owned())) {
        return Ok(id);
    }
    let index = u32::try_from(reg.metrics.len()).map_err(|_| Status::InternalFailure)?;
    if index >= (1 << 29) {
        return Err(Status::InternalFailure);
    }
    let id = (index << 2) | kind.bits();
    reg.metrics.push(Arc::new(Metric {
        name: name.to_owned(),
        kind,
        value: AtomicI64::new(0),
        histogram: Histogram::default(),
    }));
    reg.by_name.insert((kind, name.to_owned()), id);
    Ok(id)
}

fn lookup(id: u32) -> Result<Arc<Metric>, Status> {
    let reg = registry().read().unwrap_or_else(|e| e.into_inner());
    let m = reg
        .metrics
        .get((id >> 2) as usize)
        .ok_or(Status::NotFound)?;
    if m.kind.bits() != id & 3 {
        return Err(Status::NotFound);
    }
    Ok(m.clone())
}

/// `proxy_increment_metric`: counters take offsets > 0, gauges any offset, histograms none.
pub(crate) fn increment(id: u32, offset: i64) -> Result<(), Status> {
    let m = lookup(id)?;
    match m.kind {
        MetricKind::Counter if offset <= 0 => Err(Status::BadArgument),
        MetricKind::Counter | MetricKind::Gauge => {
            m.value.fetch_add(offset, Ordering::Relaxed);
            Ok(())
        }
        MetricKind::Histogram => Err(Status::BadArgument),
    }
}

/// `proxy_record_metric`: counters add, gauges set, histograms record.
pub(crate) fn record(id: u32, value: u64) -> Result<(), Status> {
    let m = lookup(id)?;
    match m.kind {
        MetricKind::Counter => {
            m.value.fetch_add(value as i64, Ordering::Relaxed);
        }
        MetricKind::Gauge => m.value.store(value as i64, Ordering::Relaxed),
        MetricKind::Histogram => m.histogram.record(value),
    }
    Ok(())
}

/// `proxy_get_metric`: counters and gauges; histograms answer `BAD_ARGUMENT`.
pub(crate) fn get(id: u32) -> Result<u64, Status> {
    let m = lookup(id)?;
    match m.kind {
        MetricKind::Histogram => Err(Status::BadArgument),
        _ => Ok(m.value.load(Ordering::Relaxed) as u64),
    }
}

/// The value of one filter-defined metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricValue {
    /// A counter.
    Counter(u64),
    /// A gauge.
    Gauge(i64),
    /// A histogram.
    Histogram(HistogramSnapshot),
}

/// One filter-defined metric, as [`filter_metrics`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricSample {
    /// The name the filter gave it.
    pub name: String,
    /// Its value.
    pub value: MetricValue,
}

/// All metrics defined by filters in this process, in definition order.
pub fn filter_metrics() -> Vec<MetricSample> {
    let reg = registry().read().unwrap_or_else(|e| e.into_inner());
    reg.metrics
        .iter()
        .map(|m| MetricSample {
            name: m.name.clone(),
            value: match m.kind {
                MetricKind::Counter => MetricValue::Counter(m.value.load(Ordering::Relaxed) as u64),
                MetricKind::Gauge => MetricValue::Gauge(m.value.load(Ordering::Relaxed)),
                MetricKind::Histogram => MetricValue::Histogram(m.histogram.snapshot()),
            },
        })
        .collect()
}

/// A Prometheus metric name from a filter's metric name: characters outside `[a-zA-Z0-9_:]`
/// become `_`, and the name is prefixed with `wasm_`.
pub fn prometheus_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 5);
    out.push_str("wasm_");
    out.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            c
        } else {
            '_'
        }
    }));
    out
}

/// Append all filter-defined metrics to `out` in the Prometheus text format.
pub fn render_filter_metrics(out: &mut String) {
    for s in filter_metrics() {
        let name = prometheus_name(&s.name);
        match s.value {
            MetricValue::Counter(v) => {
                let _ = writeln!(out, "# TYPE {name} counter\n{name} {v}");
            }
            MetricValue::Gauge(v) => {
                let _ = writeln!(out, "# TYPE {name} gauge\n{name} {v}");
            }
            MetricValue::Histogram(h) => {
                let _ = writeln!(out, "# TYPE {name} histogram");
                h.render(out, &name, "");
            }
        }
    }
}

/// Per-plugin host counters (plain atomics, shared by a plugin's per-route instances).
#[derive(Debug, Default)]
pub struct PluginStats {
    /// Guest callbacks run.
    pub callbacks: AtomicU64,
    /// Callbacks that trapped (other than interruptions and memory-cap hits).
    pub traps: AtomicU64,
    /// Callbacks interrupted at their deadline.
    pub interruptions: AtomicU64,
    /// Callbacks that failed because the VM hit its memory cap.
    pub memory_cap_hits: AtomicU64,
    /// Requests that got the failure policy (any policy).
    pub failed_streams: AtomicU64,
    /// Wall time per guest callback, in microseconds.
    pub callback_micros: Histogram,
    /// Linear memory bytes of the plugin's VM replicas (sum, updated after each callback).
    pub memory_bytes: AtomicU64,
}

/// A point-in-time copy of [`PluginStats`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// See [`PluginStats::callbacks`].
    pub callbacks: u64,
    /// See [`PluginStats::traps`].
    pub traps: u64,
    /// See [`PluginStats::interruptions`].
    pub interruptions: u64,
    /// See [`PluginStats::memory_cap_hits`].
    pub memory_cap_hits: u64,
    /// VM replicas started (first starts and recreations) of the VM the plugin runs in.
    pub vm_starts: u64,
    /// VM replica starts that failed.
    pub vm_start_failures: u64,
    /// See [`PluginStats::failed_streams`].
    pub failed_streams: u64,
    /// See [`PluginStats::callback_micros`].
    pub callback_micros: HistogramSnapshot,
    /// See [`PluginStats::memory_bytes`].
    pub memory_bytes: u64,
}

impl PluginStats {
    /// Copy the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            callbacks: l(&self.callbacks),
            traps: l(&self.traps),
            interruptions: l(&self.interruptions),
            memory_cap_hits: l(&self.memory_cap_hits),
            vm_starts: 0,
            vm_start_failures: 0,
            failed_streams: l(&self.failed_streams),
            callback_micros: self.callback_micros.snapshot(),
            memory_bytes: l(&self.memory_bytes),
        }
    }
}

/// The counter and gauge families of [`StatsSnapshot`]: name, type, help, value.
fn families(s: &StatsSnapshot) -> [(&'static str, &'static str, &'static str, u64); 8] {
    [
        (
            "weir_wasm_callbacks_total",
            "counter",
            "Guest callbacks run.",
            s.callbacks,
        ),
        (
            "weir_wasm_traps_total",
            "counter",
            "Guest callbacks that trapped.",
            s.traps,
        ),
        (
            "weir_wasm_interruptions_total",
            "counter",
            "Guest callbacks interrupted at their deadline.",
            s.interruptions,
        ),
        (
            "weir_wasm_memory_cap_hits_total",
            "counter",
            "Guest callbacks failed by the VM memory limit.",
            s.memory_cap_hits,
        ),
        (
            "weir_wasm_vm_starts_total",
            "counter",
            "VM replicas started.",
            s.vm_starts,
        ),
        (
            "weir_wasm_vm_start_failures_total",
            "counter",
            "VM replica starts that failed.",
            s.vm_start_failures,
        ),
        (
            "weir_wasm_failed_streams_total",
            "counter",
            "Requests that got the plugin's failure policy.",
            s.failed_streams,
        ),
        (
            "weir_wasm_memory_bytes",
            "gauge",
            "Linear memory of the plugin's VM replicas.",
            s.memory_bytes,
        ),
    ]
}

const DURATION: &str = "weir_wasm_callback_duration_microseconds";

fn plugin_label(plugin: &str) -> String {
    let escaped = plugin
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("plugin=\"{escaped}\"")
}

impl StatsSnapshot {
    /// Append these stats to `out` in the Prometheus text format, labelled `plugin="NAME"`,
    /// without `# TYPE` lines. For several plugins use [`render_plugin_stats`], which keeps
    /// each metric family together as the format requires.
    pub fn render_prometheus(&self, plugin: &str, out: &mut String) {
        let label = plugin_label(plugin);
        for (name, _, _, v) in families(self) {
            let _ = writeln!(out, "{name}{{{label}}} {v}");
        }
        self.callback_micros.render(out, DURATION, &label);
    }
}

/// Render the stats of several plugins (`(name, stats)`, e.g. from
/// [`crate::Plugin::name`] and [`crate::Plugin::stats`]) in the Prometheus text format, with
/// `# HELP`/`# TYPE` lines and each family's samples together.
pub fn render_plugin_stats(plugins: &[(&str, StatsSnapshot)], out: &mut String) {
    if plugins.is_empty() {
        return;
    }
    let labels: Vec<String> = plugins.iter().map(|(n, _)| plugin_label(n)).collect();
    let all: Vec<_> = plugins.iter().map(|(_, s)| families(s)).collect();
    for i in 0..all[0].len() {
        let (name, kind, help, _) = all[0][i];
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (f, label) in all.iter().zip(&labels) {
            let _ = writeln!(out, "{name}{{{label}}} {}", f[i].3);
        }
    }
    let _ = writeln!(
        out,
        "# HELP {DURATION} Wall time of guest callbacks.\n# TYPE {DURATION} histogram"
    );
    for ((_, s), label) in plugins.iter().zip(&labels) {
        s.callback_micros.render(out, DURATION, label);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_kind() {
        let c = define(0, "unit.counter").unwrap();
        let g = define(1, "unit.gauge").unwrap();
        let h = define(2, "unit.hist").unwrap();
        assert_eq!(c & 3, 0);
        assert_eq!(g & 3, 1);
        assert_eq!(h & 3, 2);
        assert_eq!(define(0, "unit.counter").unwrap(), c);
        assert_eq!(increment(c, 0), Err(Status::BadArgument));
        assert_eq!(increment(c, -1), Err(Status::BadArgument));
        increment(c, 3).unwrap();
        assert_eq!(get(c), Ok(3));
        increment(g, -2).unwrap();
        assert_eq!(get(g).map(|v| v as i64), Ok(-2));
        record(h, 7).unwrap();
        assert_eq!(get(h), Err(Status::BadArgument));
        assert_eq!(get(c | 1), Err(Status::NotFound));
        assert_eq!(define(3, "x"), Err(Status::BadArgument));
        let mut s = String::new();
        render_filter_metrics(&mut s);
        assert!(s.contains("wasm_unit_counter 3"), "{s}");
    }

    #[test]
    fn plugin_stats_families_stay_together() {
        let a = PluginStats::default();
        a.callbacks.fetch_add(2, Ordering::Relaxed);
        a.callback_micros.record(7);
        let b = PluginStats::default();
        let mut out = String::new();
        render_plugin_stats(&[("a", a.snapshot()), ("b\"q", b.snapshot())], &mut out);
        let i = out
            .find("weir_wasm_callbacks_total{plugin=\"a\"} 2")
            .unwrap();
        let j = out
            .find("weir_wasm_callbacks_total{plugin=\"b\\\"q\"} 0")
            .unwrap();
        let k = out.find("# TYPE weir_wasm_traps_total counter").unwrap();
        assert!(i < j && j < k, "{out}");
        assert!(
            out.contains(
                "weir_wasm_callback_duration_microseconds_bucket{plugin=\"a\",le=\"10\"} 1"
            )
        );
    }
}
