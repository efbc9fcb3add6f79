//! `builtin:stats`: Istio's standard HTTP metrics, recorded for every request at `on_log`.
//!
//! | metric | type | value |
//! |---|---|---|
//! | `istio_requests_total` | counter | 1 per request |
//! | `istio_request_duration_milliseconds` | histogram | start of the request to the end of the response |
//! | `istio_request_bytes` | histogram | `request.total_size` (headers and body) |
//! | `istio_response_bytes` | histogram | `response.total_size` (headers and body) |
//!
//! with Istio's labels: `reporter`, `source_*` and `destination_*` (workload, namespace,
//! principal, app, version, canonical service and revision, cluster: from the configuration,
//! else `unknown`), `destination_service` (the request's host), `destination_service_name`
//! (the upstream cluster, else the host), `destination_service_namespace`, `request_protocol`
//! (`http` or `grpc`), `response_code`, `grpc_response_status`, `response_flags` (Envoy's short
//! names) and `connection_security_policy`.
//!
//! ```yaml
//! config:
//!   reporter: source          # or destination (default source)
//!   source: { workload: weir, namespace: edge, app: weir, version: v1 }
//!   destination: { namespace: shop }
//!   max_series: 1000          # label combinations per VM replica before folding (default 1000)
//! ```
//!
//! Labels are encoded in the metric name the way Istio's own proxy-wasm stats plugin does
//! (`label=.=value;.;…;.;istio_requests_total`): Istio's bootstrap stats tags turn them into
//! Prometheus labels in Envoy, and Weir's `/metrics` does the same. Metric ids are defined once
//! per label combination and cached in the root context; past `max_series` combinations, new
//! ones are counted in one series whose per-request labels are `other`.

mod config;
mod labels;

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel, MetricType};
use weir_sdk::properties::{PropertyBatch, PropertyValues};

use crate::config::{Reporter, Settings};
use crate::labels::{RequestLabels, SeriesCache};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(StatsRoot { recorder: None })
    });
}}

/// The four metric ids of one label combination: requests, duration, request and response
/// bytes.
type SeriesIds = [u32; 4];

/// The configuration and the metric ids, shared by the root context and its requests.
struct Recorder {
    settings: Settings,
    series: SeriesCache<SeriesIds>,
}

impl Recorder {
    /// The ids for a request's labels, defined on first use.
    fn ids(&mut self, request: &RequestLabels) -> Result<SeriesIds, String> {
        let settings = &self.settings;
        let mut failed = None;
        let ids = self.series.get_or_define(&request.cache_key(), |overflow| {
            let other;
            let request = if overflow {
                other = RequestLabels::other();
                &other
            } else {
                request
            };
            let labels = labels::label_values(settings, request);
            let mut ids = [0; 4];
            for (id, (kind, base)) in ids.iter_mut().zip([
                (MetricType::Counter, labels::REQUESTS_TOTAL),
                (MetricType::Histogram, labels::REQUEST_DURATION),
                (MetricType::Histogram, labels::REQUEST_BYTES),
                (MetricType::Histogram, labels::RESPONSE_BYTES),
            ]) {
                match hostcalls::define_metric(kind, &labels::metric_name(base, &labels)) {
                    Ok(defined) => *id = defined,
                    Err(status) => failed = Some(format!("define {base}: {status:?}")),
                }
            }
            ids
        });
        match failed {
            Some(e) => Err(e),
            None => Ok(ids),
        }
    }
}

struct StatsRoot {
    recorder: Option<Rc<RefCell<Recorder>>>,
}

impl Context for StatsRoot {}

impl RootContext for StatsRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        match config::parse(&config) {
            Ok(settings) => {
                let max = settings.max_series;
                self.recorder = Some(Rc::new(RefCell::new(Recorder {
                    settings,
                    series: SeriesCache::new(max),
                })));
                true
            }
            Err(e) => {
                let _ = hostcalls::log(LogLevel::Error, &format!("stats: {e}"));
                false
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stats {
            recorder: self.recorder.clone(),
        }))
    }
}

/// One request.
struct Stats {
    /// `None` only if the plugin was never configured (nothing is recorded then).
    recorder: Option<Rc<RefCell<Recorder>>>,
}

impl Context for Stats {}

/// The properties one request's record reads, fetched together (one host call on Weir).
const PROPERTIES: [&[&str]; 9] = [
    &["request", "host"],
    &["xds", "cluster_name"],
    &["connection", "mtls"],
    &["response", "code"],
    &["response", "grpc_status"],
    &["response", "flags"],
    &["request", "duration"],
    &["request", "total_size"],
    &["response", "total_size"],
];

/// Indexes into [`PROPERTIES`].
mod at {
    pub const HOST: usize = 0;
    pub const CLUSTER: usize = 1;
    pub const MTLS: usize = 2;
    pub const CODE: usize = 3;
    pub const GRPC_STATUS: usize = 4;
    pub const FLAGS: usize = 5;
    pub const DURATION: usize = 6;
    pub const REQUEST_SIZE: usize = 7;
    pub const RESPONSE_SIZE: usize = 8;
}

thread_local! {
    /// [`PROPERTIES`], encoded once for the batch lookup.
    static BATCH: PropertyBatch = PropertyBatch::new(&PROPERTIES);
}

/// The values of [`PROPERTIES`] for one request.
struct Properties(PropertyValues);

impl Properties {
    fn fetch() -> Properties {
        Properties(BATCH.with(PropertyBatch::fetch))
    }

    fn bytes(&self, i: usize) -> Option<&[u8]> {
        self.0.get(i)
    }

    fn text(&self, i: usize) -> Option<String> {
        self.bytes(i)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    fn number(&self, i: usize) -> Option<u64> {
        Some(u64::from_le_bytes(
            self.bytes(i)?.get(..8)?.try_into().ok()?,
        ))
    }
}

impl Stats {
    /// The per-request labels, from the host's properties.
    fn request_labels(&self, settings: &Settings, p: &Properties) -> RequestLabels {
        // Bytes: a header value need not be UTF-8.
        let grpc = self
            .get_http_request_header_bytes("content-type")
            .is_some_and(|c| c.starts_with(b"application/grpc"));
        let host = p.text(at::HOST).unwrap_or_default();
        let service = match weir_sdk::address::without_port(&host) {
            "" => "unknown".to_string(),
            h => h.to_string(),
        };
        let cluster = p.text(at::CLUSTER).filter(|c| !c.is_empty());
        let (policy, peer) = match settings.reporter {
            Reporter::Source => ("unknown", None),
            Reporter::Destination => {
                let mtls = p.bytes(at::MTLS).is_some_and(|v| v.first() == Some(&1));
                let peer = (mtls && settings.source.principal.is_none())
                    .then(|| self.get_property(vec!["connection", "uri_san_peer_certificate"]))
                    .flatten()
                    .map(|v| String::from_utf8_lossy(&v).into_owned());
                (if mtls { "mutual_tls" } else { "none" }, peer)
            }
        };
        RequestLabels {
            source_principal: peer,
            destination_service_name: cluster.unwrap_or_else(|| service.clone()),
            destination_service: service,
            request_protocol: if grpc { "grpc" } else { "http" },
            response_code: p.number(at::CODE).unwrap_or(0).to_string(),
            grpc_response_status: if grpc {
                p.number(at::GRPC_STATUS)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            } else {
                String::new()
            },
            response_flags: labels::response_flags(p.number(at::FLAGS).unwrap_or(0)),
            connection_security_policy: policy,
        }
    }
}

impl HttpContext for Stats {
    fn on_log(&mut self) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        let mut recorder = recorder.borrow_mut();
        let p = Properties::fetch();
        let labels = self.request_labels(&recorder.settings, &p);
        let ids = match recorder.ids(&labels) {
            Ok(ids) => ids,
            Err(e) => {
                let _ = hostcalls::log(LogLevel::Warn, &format!("stats: {e}"));
                return;
            }
        };
        let duration_ms = p.number(at::DURATION).unwrap_or(0) / 1_000_000;
        let request_bytes = p.number(at::REQUEST_SIZE).unwrap_or(0);
        let response_bytes = p.number(at::RESPONSE_SIZE).unwrap_or(0);
        let _ = hostcalls::increment_metric(ids[0], 1);
        let _ = hostcalls::record_metric(ids[1], duration_ms);
        let _ = hostcalls::record_metric(ids[2], request_bytes);
        let _ = hostcalls::record_metric(ids[3], response_bytes);
    }
}
