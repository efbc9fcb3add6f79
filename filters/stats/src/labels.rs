//! Istio's standard labels, their values for one request, and how they are encoded into a
//! metric name (Istio's `label=.=value;.;` form, which Envoy's stats tag extraction in Istio
//! and Weir's `/metrics` both turn into Prometheus labels).

use std::collections::HashMap;

use crate::config::{Settings, Workload};

/// The counter of requests.
pub const REQUESTS_TOTAL: &str = "istio_requests_total";
/// The histogram of request durations, in milliseconds.
pub const REQUEST_DURATION: &str = "istio_request_duration_milliseconds";
/// The histogram of request sizes (headers and body), in bytes.
pub const REQUEST_BYTES: &str = "istio_request_bytes";
/// The histogram of response sizes (headers and body), in bytes.
pub const RESPONSE_BYTES: &str = "istio_response_bytes";

/// The value of labels nothing tells.
const UNKNOWN: &str = "unknown";
/// The value of per-request labels once the series limit is reached.
const OTHER: &str = "other";

/// What one request adds to the labels; everything else comes from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLabels {
    /// `source_principal` when the connection tells it (the mTLS peer of a destination
    /// reporter); `None`: from the configuration.
    pub source_principal: Option<String>,
    /// `destination_service`: the request's host without the port.
    pub destination_service: String,
    /// `destination_service_name`: the upstream cluster, else the host.
    pub destination_service_name: String,
    /// `request_protocol`: `http` or `grpc`.
    pub request_protocol: &'static str,
    /// `response_code` (`0` when no response was sent).
    pub response_code: String,
    /// `grpc_response_status` (empty for plain HTTP).
    pub grpc_response_status: String,
    /// `response_flags` (Envoy's short names, `-` for none).
    pub response_flags: String,
    /// `connection_security_policy`: `mutual_tls`, `none`, or `unknown` (source reporter).
    pub connection_security_policy: &'static str,
}

impl RequestLabels {
    /// The labels of the series that takes requests past the series limit.
    pub fn other() -> RequestLabels {
        RequestLabels {
            source_principal: None,
            destination_service: OTHER.into(),
            destination_service_name: OTHER.into(),
            request_protocol: OTHER,
            response_code: OTHER.into(),
            grpc_response_status: OTHER.into(),
            response_flags: OTHER.into(),
            connection_security_policy: OTHER,
        }
    }

    /// A key naming this combination: values joined by `\x01` (a control character no header
    /// value carries), the principal marked `1` when the connection gave it, `0` when not.
    pub fn cache_key(&self) -> String {
        let principal = match &self.source_principal {
            Some(p) => format!("1{p}"),
            None => "0".into(),
        };
        [
            &principal,
            &self.destination_service,
            &self.destination_service_name,
            self.request_protocol,
            &self.response_code,
            &self.grpc_response_status,
            &self.response_flags,
            self.connection_security_policy,
        ]
        .join("\x01")
    }
}

fn or_unknown(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| UNKNOWN.into())
}

/// `*_canonical_service`: explicit, else the app, else the workload.
fn canonical_service(w: &Workload) -> String {
    or_unknown(
        &w.canonical_service
            .clone()
            .or_else(|| w.app.clone())
            .or_else(|| w.workload.clone()),
    )
}

/// `*_canonical_revision`: explicit, else the version.
fn canonical_revision(w: &Workload) -> String {
    or_unknown(&w.canonical_revision.clone().or_else(|| w.version.clone()))
}

/// All labels of Istio's standard HTTP metrics, in Istio's order.
pub fn label_values(s: &Settings, r: &RequestLabels) -> Vec<(&'static str, String)> {
    let (src, dst) = (&s.source, &s.destination);
    vec![
        ("reporter", s.reporter.as_str().into()),
        ("source_workload", or_unknown(&src.workload)),
        ("source_canonical_service", canonical_service(src)),
        ("source_canonical_revision", canonical_revision(src)),
        ("source_workload_namespace", or_unknown(&src.namespace)),
        (
            "source_principal",
            r.source_principal
                .clone()
                .unwrap_or_else(|| or_unknown(&src.principal)),
        ),
        ("source_app", or_unknown(&src.app)),
        ("source_version", or_unknown(&src.version)),
        ("source_cluster", or_unknown(&src.cluster)),
        ("destination_workload", or_unknown(&dst.workload)),
        ("destination_workload_namespace", or_unknown(&dst.namespace)),
        ("destination_principal", or_unknown(&dst.principal)),
        ("destination_app", or_unknown(&dst.app)),
        ("destination_version", or_unknown(&dst.version)),
        ("destination_service", r.destination_service.clone()),
        ("destination_canonical_service", canonical_service(dst)),
        ("destination_canonical_revision", canonical_revision(dst)),
        (
            "destination_service_name",
            r.destination_service_name.clone(),
        ),
        ("destination_service_namespace", or_unknown(&dst.namespace)),
        ("destination_cluster", or_unknown(&dst.cluster)),
        ("request_protocol", r.request_protocol.into()),
        ("response_code", r.response_code.clone()),
        ("grpc_response_status", r.grpc_response_status.clone()),
        ("response_flags", r.response_flags.clone()),
        (
            "connection_security_policy",
            r.connection_security_policy.into(),
        ),
    ]
}

/// A metric name with labels in Istio's encoding: `label=.=value;.;` per label, then `base`.
/// `;` in a value becomes `_`, so a value can never end its piece early.
pub fn metric_name(base: &str, labels: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(base.len() + labels.len() * 32);
    for (name, value) in labels {
        out.push_str(name);
        out.push_str("=.=");
        out.extend(value.chars().map(|c| if c == ';' { '_' } else { c }));
        out.push_str(";.;");
    }
    out.push_str(base);
    out
}

/// Envoy's response flag bits (`response.flags`) and their short names, in Envoy's order.
const RESPONSE_FLAGS: [&str; 29] = [
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC",
    "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR",
];

/// `response.flags` as Envoy's access log writes it: short names joined by `,`, `-` for none.
/// Unknown bits are ignored.
pub fn response_flags(bits: u64) -> String {
    let names: Vec<&str> = RESPONSE_FLAGS
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, n)| *n)
        .collect();
    if names.is_empty() {
        "-".into()
    } else {
        names.join(",")
    }
}

/// Metric ids per label combination, bounded: after `max` combinations every new one shares
/// a single overflow entry.
#[derive(Debug)]
pub struct SeriesCache<V> {
    series: HashMap<String, V>,
    overflow: Option<V>,
    max: usize,
}

impl<V: Copy> SeriesCache<V> {
    /// An empty cache for `max` combinations.
    pub fn new(max: usize) -> Self {
        SeriesCache {
            series: HashMap::new(),
            overflow: None,
            max,
        }
    }

    /// The entry for `key`, made by `define(false)` the first time; past the limit the
    /// overflow entry, made once by `define(true)`.
    pub fn get_or_define(&mut self, key: &str, define: impl FnOnce(bool) -> V) -> V {
        if let Some(v) = self.series.get(key) {
            return *v;
        }
        if self.series.len() >= self.max {
            return *self.overflow.get_or_insert_with(|| define(true));
        }
        let v = define(false);
        self.series.insert(key.to_owned(), v);
        v
    }

    /// Combinations kept (the overflow entry not counted).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.series.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> RequestLabels {
        RequestLabels {
            source_principal: None,
            destination_service: "shop.example".into(),
            destination_service_name: "shop".into(),
            request_protocol: "http",
            response_code: "200".into(),
            grpc_response_status: String::new(),
            response_flags: "-".into(),
            connection_security_policy: "unknown",
        }
    }

    #[test]
    fn istio_label_set_with_configured_and_unknown_values() {
        let mut s = crate::config::parse(b"").unwrap();
        s.source.workload = Some("weir".into());
        s.source.app = Some("edge".into());
        s.destination.namespace = Some("shop-ns".into());
        s.destination.version = Some("v2".into());
        let labels = label_values(&s, &request());
        assert_eq!(labels.len(), 25);
        let get = |k: &str| labels.iter().find(|(n, _)| *n == k).unwrap().1.clone();
        assert_eq!(get("reporter"), "source");
        assert_eq!(get("source_workload"), "weir");
        assert_eq!(
            get("source_canonical_service"),
            "edge",
            "app before workload"
        );
        assert_eq!(get("source_canonical_revision"), "unknown");
        assert_eq!(get("source_principal"), "unknown");
        assert_eq!(get("destination_workload_namespace"), "shop-ns");
        assert_eq!(get("destination_service_namespace"), "shop-ns");
        assert_eq!(get("destination_canonical_revision"), "v2");
        assert_eq!(get("destination_canonical_service"), "unknown");
        assert_eq!(get("destination_service"), "shop.example");
        assert_eq!(get("destination_service_name"), "shop");
        assert_eq!(get("response_code"), "200");
        assert_eq!(get("grpc_response_status"), "");
        let mut r = request();
        r.source_principal = Some("spiffe://cluster.local/ns/a/sa/b".into());
        let labels = label_values(&s, &r);
        assert_eq!(labels[5].1, "spiffe://cluster.local/ns/a/sa/b");
    }

    #[test]
    fn names_use_istio_encoding() {
        let labels = vec![
            ("reporter", "source".to_string()),
            ("destination_service", "a;.;b".to_string()),
            ("grpc_response_status", String::new()),
        ];
        assert_eq!(
            metric_name(REQUESTS_TOTAL, &labels),
            "reporter=.=source;.;destination_service=.=a_._b;.;grpc_response_status=.=;.;istio_requests_total"
        );
    }

    #[test]
    fn cache_keys_tell_combinations_apart() {
        let a = request();
        let mut b = request();
        b.response_code = "404".into();
        assert_ne!(a.cache_key(), b.cache_key());
        let mut c = request();
        c.source_principal = Some(String::new());
        assert_ne!(
            a.cache_key(),
            c.cache_key(),
            "configured vs. connection principal"
        );
        assert_eq!(a.cache_key(), request().cache_key());
    }

    #[test]
    fn flags() {
        assert_eq!(response_flags(0), "-");
        assert_eq!(response_flags(0x20), "UF");
        assert_eq!(response_flags(0x800 | 0x8000 | 0x1), "LH,RL,URX");
        assert_eq!(response_flags(1 << 28), "DR");
        assert_eq!(response_flags(1 << 40), "-", "unknown bits are ignored");
    }

    #[test]
    fn series_are_capped_then_folded() {
        let mut cache = SeriesCache::new(2);
        let mut defined = Vec::new();
        let mut next = 0;
        let mut get = |cache: &mut SeriesCache<u32>, key: &str| {
            cache.get_or_define(key, |overflow| {
                next += 1;
                defined.push((key.to_string(), overflow));
                next
            })
        };
        assert_eq!(get(&mut cache, "a"), 1);
        assert_eq!(get(&mut cache, "b"), 2);
        assert_eq!(get(&mut cache, "a"), 1, "cached");
        assert_eq!(get(&mut cache, "c"), 3, "the overflow series");
        assert_eq!(get(&mut cache, "d"), 3, "shared by every later combination");
        assert_eq!(get(&mut cache, "b"), 2, "known ones keep their series");
        assert_eq!(cache.len(), 2);
        assert_eq!(
            defined,
            [
                ("a".to_string(), false),
                ("b".to_string(), false),
                ("c".to_string(), true)
            ]
        );
    }
}
