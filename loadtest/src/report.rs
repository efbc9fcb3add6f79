//! What a run measured: counts, throughput and the latency distribution, as JSON and Markdown.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Lowest latency a histogram tracks, in nanoseconds (1 keeps nanosecond resolution at the low
/// end; a larger value would coarsen every bucket to a power of two of it).
const LOWEST_NS: u64 = 1;
/// Highest latency a histogram tracks, in nanoseconds (larger values are clamped to it).
const HIGHEST_NS: u64 = 300 * 1_000_000_000;
/// Significant decimal digits kept by the histograms.
const SIGFIG: u8 = 3;

/// A latency histogram in nanoseconds, up to 300 s, three significant digits (~230 KB).
#[derive(Debug, Clone)]
pub struct Latencies {
    hist: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Latencies {
    /// An empty histogram.
    pub fn new() -> Self {
        let hist = Histogram::new_with_bounds(LOWEST_NS, HIGHEST_NS, SIGFIG)
            .expect("constant bounds are valid");
        Self { hist }
    }

    /// Records one latency (values outside the tracked range are clamped into it).
    pub fn record(&mut self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos())
            .unwrap_or(u64::MAX)
            .clamp(LOWEST_NS, HIGHEST_NS);
        self.hist.saturating_record(ns);
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Latencies) {
        self.hist
            .add(&other.hist)
            .expect("histograms with the same bounds always merge");
    }

    /// How many values were recorded.
    pub fn len(&self) -> u64 {
        self.hist.len()
    }

    /// Whether no value was recorded.
    pub fn is_empty(&self) -> bool {
        self.hist.is_empty()
    }

    /// The summary of the distribution (all zeros when empty).
    pub fn summary(&self) -> LatencySummary {
        if self.hist.is_empty() {
            return LatencySummary::default();
        }
        let us = |ns: u64| ns as f64 / 1_000.0;
        LatencySummary {
            count: self.hist.len(),
            mean_us: self.hist.mean() / 1_000.0,
            p50_us: us(self.hist.value_at_quantile(0.50)),
            p90_us: us(self.hist.value_at_quantile(0.90)),
            p99_us: us(self.hist.value_at_quantile(0.99)),
            p999_us: us(self.hist.value_at_quantile(0.999)),
            max_us: us(self.hist.max()),
        }
    }

    /// Latency by percentile, for charts: points `(percentile, µs)` spaced evenly on the
    /// `-log10(1 - q)` axis from 0 up to 99.999 %, and the maximum as the last point.
    pub fn curve(&self) -> Vec<[f64; 2]> {
        if self.hist.is_empty() {
            return Vec::new();
        }
        let mut points: Vec<[f64; 2]> = (0..=50)
            .map(|step| {
                let q = 1.0 - 10f64.powf(-f64::from(step) / 10.0);
                [q * 100.0, self.hist.value_at_quantile(q) as f64 / 1_000.0]
            })
            .collect();
        points.push([100.0, self.hist.max() as f64 / 1_000.0]);
        points
    }
}

/// Percentiles of a latency distribution, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Number of latencies recorded.
    pub count: u64,
    /// Mean latency.
    pub mean_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest latency recorded.
    pub max_us: f64,
}

/// The result of one generator run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// Free-form name of what was measured (the runner puts the contender's name here).
    pub label: String,
    /// `closed` (as fast as possible) or `open` (constant rate).
    pub mode: String,
    /// Protocol spoken: `h1`, `h2c`, `h1-tls` or `h2-tls`.
    pub protocol: String,
    /// Whether every request used a new connection (and so a full TLS handshake).
    pub new_connection_per_request: bool,
    /// Address the requests went to.
    pub target: String,
    /// Connections used (or, with a new connection per request, concurrent requests).
    pub connections: usize,
    /// Concurrent requests on each connection (HTTP/2 streams).
    pub streams_per_connection: usize,
    /// Requested rate in an open-loop run, requests per second.
    pub rate: Option<f64>,
    /// Warm-up left out of every figure, seconds.
    pub warmup_s: f64,
    /// Length of the measured window, seconds.
    pub duration_s: f64,
    /// Responses with a 2xx status in the window.
    pub ok: u64,
    /// Responses with another status in the window.
    pub non_2xx: u64,
    /// Requests that got no complete response: connect, TLS, protocol errors and timeouts.
    pub errors: u64,
    /// 2xx responses per second over the window, or, in an open loop the server could not
    /// follow, over the time until the last of them ended (the rate actually served).
    pub throughput_rps: f64,
    /// Body bytes received in the window.
    pub body_bytes: u64,
    /// Latency of the 2xx responses: from send (closed loop) or from the intended send time
    /// (open loop) to the end of the body.
    pub latency: LatencySummary,
    /// Latency by percentile `(percentile, µs)`, for charts.
    pub latency_curve: Vec<[f64; 2]>,
    /// CPU time (user and system) the proxy's processes used over the window, per response,
    /// in µs. Set by `weir-bench`, which knows the proxy; the generator leaves it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_cpu_us_per_response: Option<f64>,
}

impl RunReport {
    /// Requests that did not end in a 2xx response.
    pub fn failed(&self) -> u64 {
        self.errors + self.non_2xx
    }
}

/// Formats microseconds for a table: `850µs`, `1.25ms`, `2.10s`.
pub fn fmt_us(us: f64) -> String {
    if us < 1_000.0 {
        format!("{us:.0}µs")
    } else if us < 1_000_000.0 {
        format!("{:.2}ms", us / 1_000.0)
    } else {
        format!("{:.2}s", us / 1_000_000.0)
    }
}

/// Formats a rate with a thousands separator: `123,456`.
pub fn fmt_rate(rps: f64) -> String {
    let n = rps.round() as u64;
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The Markdown header of [`markdown_row`].
pub const MARKDOWN_HEADER: &str = "| run | req/s | p50 | p90 | p99 | p99.9 | max | errors | non-2xx |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n";

/// One Markdown table row for a report.
pub fn markdown_row(r: &RunReport) -> String {
    let l = &r.latency;
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
        r.label,
        fmt_rate(r.throughput_rps),
        fmt_us(l.p50_us),
        fmt_us(l.p90_us),
        fmt_us(l.p99_us),
        fmt_us(l.p999_us),
        fmt_us(l.max_us),
        r.errors,
        r.non_2xx
    )
}

/// The middle value (mean of the two middle ones for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_uniform_latencies() {
        let mut h = Latencies::new();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        let close = |a: f64, b: f64| (a - b).abs() / b < 0.002;
        assert!(close(s.p50_us, 500.0), "{s:?}");
        assert!(close(s.p90_us, 900.0), "{s:?}");
        assert!(close(s.p99_us, 990.0), "{s:?}");
        assert!(close(s.p999_us, 999.0), "{s:?}");
        assert!(close(s.max_us, 1000.0), "{s:?}");
        assert!(close(s.mean_us, 500.5), "{s:?}");
    }

    #[test]
    fn an_outlier_shows_at_the_tail_only() {
        let mut h = Latencies::new();
        for _ in 0..9_999 {
            h.record(Duration::from_micros(100));
        }
        h.record(Duration::from_secs(2));
        let s = h.summary();
        assert!((s.p99_us - 100.0).abs() < 1.0, "{s:?}");
        assert!((s.p999_us - 100.0).abs() < 1.0, "{s:?}");
        assert!(
            (s.max_us - 2_000_000.0).abs() / 2_000_000.0 < 0.001,
            "{s:?}"
        );
    }

    #[test]
    fn out_of_range_values_are_clamped_not_lost() {
        let mut h = Latencies::new();
        h.record(Duration::ZERO);
        h.record(Duration::from_secs(10_000));
        assert_eq!(h.len(), 2);
        assert!(h.summary().max_us >= 299_000_000.0);
    }

    #[test]
    fn merging_adds_counts() {
        let mut a = Latencies::new();
        let mut b = Latencies::new();
        a.record(Duration::from_micros(10));
        b.record(Duration::from_micros(20));
        b.record(Duration::from_micros(30));
        a.merge(&b);
        assert_eq!(a.len(), 3);
        assert!((a.summary().max_us - 30.0).abs() < 0.1);
    }

    #[test]
    fn empty_summary_and_curve() {
        let h = Latencies::new();
        assert_eq!(h.summary(), LatencySummary::default());
        assert!(h.curve().is_empty());
    }

    #[test]
    fn curve_is_monotonic_and_ends_at_max() {
        let mut h = Latencies::new();
        for us in 1..=10_000u64 {
            h.record(Duration::from_micros(us));
        }
        let c = h.curve();
        assert_eq!(c.first().unwrap()[0], 0.0);
        assert_eq!(c.last().unwrap()[0], 100.0);
        for w in c.windows(2) {
            assert!(w[1][0] >= w[0][0] && w[1][1] >= w[0][1], "{w:?}");
        }
        assert!((c.last().unwrap()[1] - 10_000.0).abs() < 10.0);
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_us(850.4), "850µs");
        assert_eq!(fmt_us(1_250.0), "1.25ms");
        assert_eq!(fmt_us(2_100_000.0), "2.10s");
        assert_eq!(fmt_rate(0.0), "0");
        assert_eq!(fmt_rate(999.6), "1,000");
        assert_eq!(fmt_rate(1_234_567.0), "1,234,567");
    }

    #[test]
    fn markdown_row_has_all_columns() {
        let r = RunReport {
            label: "nginx".into(),
            throughput_rps: 12_345.0,
            errors: 2,
            non_2xx: 1,
            latency: LatencySummary {
                p50_us: 100.0,
                p99_us: 2_000.0,
                ..Default::default()
            },
            ..Default::default()
        };
        let row = markdown_row(&r);
        assert_eq!(
            row.matches('|').count(),
            MARKDOWN_HEADER.lines().next().unwrap().matches('|').count()
        );
        assert!(row.starts_with("| nginx | 12,345 | 100µs |"), "{row}");
        assert!(row.ends_with("| 2 | 1 |\n"), "{row}");
        assert_eq!(r.failed(), 3);
    }

    #[test]
    fn report_round_trips_through_json() {
        let r = RunReport {
            label: "x".into(),
            rate: Some(5.0),
            latency_curve: vec![[50.0, 1.0]],
            ..Default::default()
        };
        let back: RunReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 1.0]), Some(1.0));
    }
}
