//! Metrics defined by filters (`proxy_define_metric`) and the host's own per-plugin stats.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use crate::types::Status;
use crate::vm::CPU_SAMPLE_EVERY;

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

/// A filter metric's name as exported to Prometheus: the metric (family) name and its labels.
///
/// See [`prometheus_metric_name`] for how a filter's name maps to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrometheusName {
    /// The metric name: `[a-zA-Z0-9_:]` only, `wasm_` in front unless it starts with `istio_`.
    pub name: String,
    /// Label names (`[a-zA-Z0-9_]`, not starting with a digit) and raw (unescaped) values, in
    /// the order the filter wrote them; a repeated label name keeps its first value.
    pub labels: Vec<(String, String)>,
}

/// Split a filter's metric name into base name and labels, in one of the two encodings:
///
/// - Istio's (the proxy-wasm C++ SDK's `Metric` with `;.;` and `=.=` separators): pieces
///   separated by `;.;`, each `label=.=value`, plus exactly one piece without `=.=`, the base
///   name, e.g. `reporter=.=source;.;response_code=.=200;.;istio_requests_total`.
/// - Weir's: `base;label=value;label2=value2` (values cannot contain `;`).
///
/// `None` when the name uses neither (a plain name, or a malformed encoding).
fn split_labels(name: &str) -> Option<(&str, Vec<(&str, &str)>)> {
    let mut labels = Vec::new();
    let base = if name.contains("=.=") {
        let mut base = None;
        for piece in name.split(";.;").filter(|p| !p.is_empty()) {
            match piece.split_once("=.=") {
                Some(pair) => labels.push(pair),
                None if base.is_none() => base = Some(piece),
                None => return None,
            }
        }
        base?
    } else {
        let mut pieces = name.split(';');
        let base = pieces.next()?;
        for piece in pieces.filter(|p| !p.is_empty()) {
            labels.push(piece.split_once('=')?);
        }
        base
    };
    if base.is_empty() || labels.is_empty() || labels.iter().any(|(k, _)| k.is_empty()) {
        return None;
    }
    Some((base, labels))
}

/// Map `name` to Prometheus: labels encoded in the name (see [`split_labels`]: Istio's
/// `label=.=value;.;…;.;base` or Weir's `base;label=value;…`) become Prometheus labels; in the
/// base name, characters outside `[a-zA-Z0-9_:]` become `_`, and `wasm_` is put in front unless
/// it starts with `istio_` (so Istio's standard metrics keep their names). A name that encodes
/// no labels (or encodes them wrongly) is exported whole as the metric name, with no labels.
pub fn prometheus_metric_name(name: &str) -> PrometheusName {
    let (base, raw_labels) = split_labels(name).unwrap_or((name, Vec::new()));
    let mut out = String::with_capacity(base.len() + 5);
    if !base.starts_with("istio_") {
        out.push_str("wasm_");
    }
    out.extend(base.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            c
        } else {
            '_'
        }
    }));
    let mut labels: Vec<(String, String)> = Vec::with_capacity(raw_labels.len());
    for (k, v) in raw_labels {
        let mut key: String = k
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        if key.starts_with(|c: char| c.is_ascii_digit()) {
            key.insert(0, '_');
        }
        if !labels.iter().any(|(seen, _)| *seen == key) {
            labels.push((key, v.to_owned()));
        }
    }
    PrometheusName { name: out, labels }
}

/// The Prometheus metric name of a filter's metric: [`prometheus_metric_name`] without the
/// labels.
pub fn prometheus_name(name: &str) -> String {
    prometheus_metric_name(name).name
}

/// `name="value",...` with values escaped as the text format requires (`\`, `"`, newline).
/// For histograms a label named `le` (reserved for buckets) is written as `_le`.
fn render_labels(labels: &[(String, String)], histogram: bool) -> String {
    let mut out = String::new();
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if histogram && k == "le" {
            out.push('_');
        }
        out.push_str(k);
        out.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out
}

fn kind_of(v: &MetricValue) -> (MetricKind, &'static str) {
    match v {
        MetricValue::Counter(_) => (MetricKind::Counter, "counter"),
        MetricValue::Gauge(_) => (MetricKind::Gauge, "gauge"),
        MetricValue::Histogram(_) => (MetricKind::Histogram, "histogram"),
    }
}

/// Append all filter-defined metrics to `out` in the Prometheus text format.
///
/// Names map as [`prometheus_metric_name`] says. All samples of one metric name come together
/// under one `# TYPE` line, families in the order their first sample was defined; when filters
/// use one name for metrics of different kinds, the later kinds get `_gauge`, `_counter` or
/// `_histogram` appended.
pub fn render_filter_metrics(out: &mut String) {
    /// One metric name: its type and its samples (rendered labels, value).
    struct Family {
        name: String,
        type_name: &'static str,
        samples: Vec<(String, MetricValue)>,
    }
    let mut families: Vec<Family> = Vec::new();
    let mut index: HashMap<(String, MetricKind), usize> = HashMap::new();
    let mut first_kind: HashMap<String, MetricKind> = HashMap::new();
    for s in filter_metrics() {
        let (kind, type_name) = kind_of(&s.value);
        let PrometheusName { mut name, labels } = prometheus_metric_name(&s.name);
        if *first_kind.entry(name.clone()).or_insert(kind) != kind {
            name = format!("{name}_{type_name}");
        }
        let labels = render_labels(&labels, kind == MetricKind::Histogram);
        let i = *index.entry((name.clone(), kind)).or_insert_with(|| {
            families.push(Family {
                name,
                type_name,
                samples: Vec::new(),
            });
            families.len() - 1
        });
        families[i].samples.push((labels, s.value));
    }
    for Family {
        name,
        type_name,
        samples,
    } in families
    {
        let _ = writeln!(out, "# TYPE {name} {type_name}");
        for (labels, value) in samples {
            let braces = if labels.is_empty() {
                String::new()
            } else {
                format!("{{{labels}}}")
            };
            match value {
                MetricValue::Counter(v) => {
                    let _ = writeln!(out, "{name}{braces} {v}");
                }
                MetricValue::Gauge(v) => {
                    let _ = writeln!(out, "{name}{braces} {v}");
                }
                MetricValue::Histogram(h) => h.render(out, &name, &labels),
            }
        }
    }
}

/// The VMs of an engine alive now, whatever plugin or configuration they belong to: VMs of
/// an old configuration count until their last request is done and they are freed.
#[derive(Debug, Default)]
pub struct LiveVms {
    /// VM instances (replicas) alive.
    pub vms: AtomicU64,
    /// Their linear memory, in bytes (as of each VM's last guest call).
    pub memory_bytes: AtomicU64,
}

/// Per-plugin host counters (plain atomics, shared by a plugin's per-route instances).
#[derive(Debug, Default)]
pub struct PluginStats {
    /// Guarded calls into the guest: one per callback, except that a stream's context creation
    /// rides with its first callback and its `on_log`, `on_done` and `on_delete` are one call.
    pub callbacks: crate::threads::ShardedCounter,
    /// Callbacks that trapped (other than interruptions and memory-cap hits).
    pub traps: AtomicU64,
    /// Callbacks interrupted at their deadline.
    pub interruptions: AtomicU64,
    /// Callbacks that failed because the VM hit its memory cap.
    pub memory_cap_hits: AtomicU64,
    /// Requests that got the failure policy (any policy).
    pub failed_streams: AtomicU64,
    /// CPU time of guest callbacks, in nanoseconds, sampled: one callback in
    /// [`CPU_SAMPLE_EVERY`](crate::CPU_SAMPLE_EVERY) per VM replica is measured (the thread's CPU
    /// clock, so time the thread was descheduled does not count).
    pub callback_cpu_nanos: Histogram,
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
    /// See [`PluginStats::callback_cpu_nanos`].
    pub callback_cpu_nanos: HistogramSnapshot,
    /// See [`PluginStats::memory_bytes`].
    pub memory_bytes: u64,
}

impl PluginStats {
    /// Copy the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            callbacks: self.callbacks.get(),
            traps: l(&self.traps),
            interruptions: l(&self.interruptions),
            memory_cap_hits: l(&self.memory_cap_hits),
            vm_starts: 0,
            vm_start_failures: 0,
            failed_streams: l(&self.failed_streams),
            callback_cpu_nanos: self.callback_cpu_nanos.snapshot(),
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

const CPU_TIME: &str = "weir_wasm_callback_cpu_nanoseconds";

fn plugin_label(plugin: &str) -> String {
    let escaped = plugin
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("plugin=\"{escaped}\"")
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
        "# HELP {CPU_TIME} CPU time of guest callbacks (one in {CPU_SAMPLE_EVERY} sampled).\n# TYPE {CPU_TIME} histogram"
    );
    for ((_, s), label) in plugins.iter().zip(&labels) {
        s.callback_cpu_nanos.render(out, CPU_TIME, label);
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
        a.callbacks.add(2);
        a.callback_cpu_nanos.record(7);
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
            out.contains("weir_wasm_callback_cpu_nanoseconds_bucket{plugin=\"a\",le=\"10\"} 1")
        );
    }

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn names_with_labels_map_to_prometheus() {
        let istio = prometheus_metric_name(
            "reporter=.=source;.;response_code=.=200;.;istio_requests_total",
        );
        assert_eq!(
            istio.name, "istio_requests_total",
            "istio_ names keep no prefix"
        );
        assert_eq!(
            istio.labels,
            labels(&[("reporter", "source"), ("response_code", "200")])
        );
        // Base first works too, and an empty value is a value.
        let istio = prometheus_metric_name("istio_x;.;grpc_response_status=.=;.;");
        assert_eq!(istio.labels, labels(&[("grpc_response_status", "")]));
        let weir = prometheus_metric_name("cache.hits;tier=l1;9lives=a=b;tier=l2");
        assert_eq!(weir.name, "wasm_cache_hits");
        assert_eq!(
            weir.labels,
            labels(&[("tier", "l1"), ("_9lives", "a=b")]),
            "label names sanitized, values raw, first value of a repeated label kept"
        );
        let plain = prometheus_metric_name("my-filter.requests");
        assert_eq!(plain.name, "wasm_my_filter_requests");
        assert!(plain.labels.is_empty());
        // Malformed encodings are exported whole, as plain names.
        for bad in [
            "a;b",
            ";k=v",
            "a;=v",
            "k=.=v;.;",
            "one;.;two;.;k=.==.=v",
            "x;.;=.=v",
        ] {
            let p = prometheus_metric_name(bad);
            assert!(p.labels.is_empty(), "{bad}: {p:?}");
            assert!(p.name.starts_with("wasm_"), "{bad}: {p:?}");
        }
    }

    #[test]
    fn labelled_samples_share_one_type_line() {
        let ok = define(0, "unit_render;code=200;path=/a\"b\\c").unwrap();
        let not_found = define(0, "unit_render;code=404;path=x\ny").unwrap();
        let plain = define(0, "unit_render").unwrap();
        let hist = define(2, "unit_render_ms;code=200;le=x").unwrap();
        let other_kind = define(1, "unit_render;code=1").unwrap();
        let istio = define(0, "reporter=.=source;.;istio_unit_render_total").unwrap();
        increment(ok, 2).unwrap();
        increment(not_found, 1).unwrap();
        increment(plain, 5).unwrap();
        record(hist, 3).unwrap();
        record(other_kind, 9).unwrap();
        increment(istio, 4).unwrap();
        let mut s = String::new();
        render_filter_metrics(&mut s);
        assert_eq!(
            s.matches("# TYPE wasm_unit_render counter").count(),
            1,
            "{s}"
        );
        let family: Vec<&str> = s
            .lines()
            .skip_while(|l| *l != "# TYPE wasm_unit_render counter")
            .skip(1)
            .take_while(|l| !l.starts_with('#'))
            .collect();
        assert_eq!(
            family,
            [
                "wasm_unit_render{code=\"200\",path=\"/a\\\"b\\\\c\"} 2",
                "wasm_unit_render{code=\"404\",path=\"x\\ny\"} 1",
                "wasm_unit_render 5",
            ],
            "{s}"
        );
        assert!(
            s.contains(
                "# TYPE wasm_unit_render_gauge gauge\nwasm_unit_render_gauge{code=\"1\"} 9\n"
            ),
            "{s}"
        );
        assert!(s.contains("# TYPE wasm_unit_render_ms histogram\n"), "{s}");
        assert!(
            s.contains("wasm_unit_render_ms_bucket{code=\"200\",_le=\"x\",le=\"5\"} 1\n"),
            "{s}"
        );
        assert!(
            s.contains("wasm_unit_render_ms_count{code=\"200\",_le=\"x\"} 1\n"),
            "{s}"
        );
        assert!(
            s.contains("# TYPE istio_unit_render_total counter\nistio_unit_render_total{reporter=\"source\"} 4\n"),
            "{s}"
        );
    }
}
