//! Compiling a parsed config into a `Snapshot`: every check, with the file, line and column of
//! each problem. Compiling happens away from the request path; a config with any error is
//! rejected whole and the running snapshot keeps serving.
//!
//! Two phases: `check` validates everything and prepares specs without side effects (what
//! `weir validate` runs); `instantiate` starts clusters (reusing unchanged ones with their
//! pools and health state) and builds the route tables.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, StatusCode};
use regex::Regex;
use serde_saphyr::Location;

use super::duration::or;
use super::plugins::{
    PendingLink, PendingPlugin, check_chain, check_plugins, instantiate_plugins, links,
};
use super::schema::{self, S};
use super::{ConfigError, ConfigErrors};
use crate::ratelimit::{Key, RouteRateLimiter};
use crate::route::matcher::{Conditions, HostPattern, PathCond, ValueCond};
use crate::route::table::{
    Action, Backend, HeaderEdits, RedirectAction, Rewrite, Route, RouteTable, WeightedBackends,
};
use crate::snapshot::{DemoSpec, Limits, ListenerSpec, Snapshot, TcpProxySpec};
use crate::telemetry::access_log::{AccessLog, DEFAULT_FORMAT, Format};
use crate::telemetry::metrics::Registry;
use crate::upstream::cluster::{
    Cluster, ClusterSpec, EndpointSpec, HealthCheckSpec, OutlierSpec, SubsetSpec,
};
use crate::upstream::connector::UpstreamTls;
use crate::upstream::lb::{HashOn, Policy};
use crate::upstream::retry::{RetryOn, RetryPolicy};

/// A checked config, ready to instantiate.
pub struct Checked {
    clusters: Vec<(ClusterSpec, String)>,
    routes: Vec<PendingRoute>,
    listeners: Vec<ListenerSpec>,
    access_log: Option<(Format, String, usize)>,
    admin: Option<SocketAddr>,
    demo_backends: Vec<DemoSpec>,
    drain_timeout: Duration,
    watch: bool,
    config_json: serde_json::Value,
    plugins: Vec<PendingPlugin>,
    listener_filters: Vec<(Arc<str>, Vec<PendingLink>)>,
    cache_dir: std::path::PathBuf,
    file: String,
}

struct PendingRoute {
    name: String,
    listeners: Vec<String>,
    hosts: Vec<HostPattern>,
    conditions: Conditions,
    action: PendingAction,
    request_headers: HeaderEdits,
    response_headers: HeaderEdits,
    rewrite: Rewrite,
    timeout: Option<Duration>,
    retry: RetryPolicy,
    rate_limit: Option<(NonZeroU32, Duration, NonZeroU32, Key, String)>,
    filters: Vec<PendingLink>,
}

enum PendingAction {
    Proxy(Vec<(String, Option<usize>, u32)>),
    Redirect(RedirectAction),
    Direct {
        status: StatusCode,
        body: bytes::Bytes,
        content_type: Option<HeaderValue>,
    },
}

struct Checker<'a> {
    file: &'a str,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    fn err(&mut self, at: &Location, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line: at.line() as usize,
            column: at.column() as usize,
            message: message.into(),
        });
    }

    fn regex(&mut self, s: &S<String>, field: &str) -> Option<Regex> {
        match Regex::new(&format!("^(?:{})$", s.value)) {
            Ok(r) => Some(r),
            Err(e) => {
                let text = e.to_string();
                let last = text.lines().last().unwrap_or("").trim();
                let first = last.strip_prefix("error: ").unwrap_or(last);
                self.err(
                    &s.referenced,
                    format!("{field}: invalid regular expression `{}`: {first}", s.value),
                );
                None
            }
        }
    }

    fn header_name(&mut self, at: &Location, name: &str, field: &str) -> Option<HeaderName> {
        match HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
            Ok(n) => Some(n),
            Err(_) => {
                self.err(at, format!("{field}: invalid header name `{name}`"));
                None
            }
        }
    }

    fn socket_addr(&mut self, s: &S<String>, field: &str) -> Option<SocketAddr> {
        match s.value.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    &s.referenced,
                    format!("{field}: `{}` is not an IP:PORT address", s.value),
                );
                None
            }
        }
    }
}

/// Check a parsed config. `json` is the same document as JSON (for `/config_dump` and
/// fingerprints); `base_dir` resolves relative file paths.
pub fn check(
    cfg: &schema::Config,
    json: serde_json::Value,
    file: &str,
    base_dir: &std::path::Path,
) -> Result<Checked, ConfigErrors> {
    let mut c = Checker {
        file,
        errors: Vec::new(),
    };
    let path_of = |p: &str| -> String {
        let pb = std::path::Path::new(p);
        if pb.is_absolute() {
            p.to_string()
        } else {
            base_dir.join(pb).to_string_lossy().into_owned()
        }
    };

    // Clusters.
    let mut clusters = Vec::new();
    let mut cluster_names: HashMap<String, Vec<String>> = HashMap::new();
    for (i, cl) in cfg.clusters.iter().enumerate() {
        let name = cl.name.value.clone();
        if name.is_empty() {
            c.err(&cl.name.referenced, "clusters[].name: must not be empty");
        }
        if cluster_names.contains_key(&name) {
            c.err(
                &cl.name.referenced,
                format!("clusters[].name: duplicate cluster name `{name}`"),
            );
        }
        cluster_names.insert(
            name.clone(),
            cl.subsets.iter().map(|s| s.name.value.clone()).collect(),
        );
        if cl.endpoints.is_empty() {
            c.err(
                &cl.name.referenced,
                format!("clusters[{name}].endpoints: a cluster needs at least one endpoint"),
            );
        }
        let mut endpoints = Vec::new();
        for ep in &cl.endpoints {
            match split_host_port(&ep.address.value) {
                Some((host, port)) => endpoints.push(EndpointSpec {
                    host,
                    port,
                    weight: ep.weight.unwrap_or(1).max(1),
                    labels: ep.labels.clone(),
                }),
                None => c.err(
                    &ep.address.referenced,
                    format!(
                        "clusters[{name}].endpoints[].address: `{}` is not HOST:PORT",
                        ep.address.value
                    ),
                ),
            }
        }
        let mut subsets = Vec::new();
        let mut subset_names = HashSet::new();
        for s in &cl.subsets {
            if !subset_names.insert(s.name.value.clone()) {
                c.err(
                    &s.name.referenced,
                    format!(
                        "clusters[{name}].subsets[].name: duplicate subset `{}`",
                        s.name.value
                    ),
                );
            }
            if s.labels.is_empty() {
                c.err(
                    &s.name.referenced,
                    format!(
                        "clusters[{name}].subsets[{}].labels: a subset needs labels",
                        s.name.value
                    ),
                );
            }
            subsets.push(SubsetSpec {
                name: s.name.value.clone(),
                labels: s.labels.clone(),
            });
        }
        let policy = match cl
            .load_balancing
            .policy
            .as_ref()
            .map(|p| (p.value.as_str(), &p.referenced))
        {
            None | Some(("round_robin", _)) => Policy::RoundRobin,
            Some(("least_request", _)) => Policy::LeastRequest,
            Some(("random", _)) => Policy::Random,
            Some(("ring_hash", _)) => {
                let on = match &cl.load_balancing.hash_on {
                    None => HashOn::SourceIp,
                    Some(h) => match parse_hash_on(&h.value) {
                        Some(on) => on,
                        None => {
                            c.err(&h.referenced, format!("clusters[{name}].load_balancing.hash_on: `{}`: expected `header:NAME`, `cookie:NAME` or `source_ip`", h.value));
                            HashOn::SourceIp
                        }
                    },
                };
                Policy::RingHash(on)
            }
            Some((other, at)) => {
                c.err(at, format!("clusters[{name}].load_balancing.policy: unknown policy `{other}`: expected round_robin, least_request, random or ring_hash"));
                Policy::RoundRobin
            }
        };
        if let (Some(h), false) = (
            &cl.load_balancing.hash_on,
            matches!(policy, Policy::RingHash(_)),
        ) {
            c.err(
                &h.referenced,
                format!(
                    "clusters[{name}].load_balancing.hash_on: only used with policy `ring_hash`"
                ),
            );
        }
        let http2 = match cl
            .protocol
            .as_ref()
            .map(|p| (p.value.as_str(), &p.referenced))
        {
            None | Some(("http1", _)) => false,
            Some(("http2", _)) => true,
            Some((other, at)) => {
                c.err(at, format!("clusters[{name}].protocol: unknown protocol `{other}`: expected http1 or http2"));
                false
            }
        };
        let tls = match &cl.tls {
            None => None,
            Some(t) => {
                let ca = t.ca.as_ref().map(|ca| path_of(&ca.value));
                match crate::tls::client_config(ca.as_deref(), t.insecure_skip_verify, http2) {
                    Ok(cfg) => {
                        let sni = match &t.sni {
                            Some(s) => rustls_pki_types::ServerName::try_from(s.clone()).ok(),
                            None => endpoints.first().and_then(|e| {
                                rustls_pki_types::ServerName::try_from(e.host.clone()).ok()
                            }),
                        };
                        Some(UpstreamTls {
                            connector: tokio_rustls::TlsConnector::from(cfg),
                            sni,
                        })
                    }
                    Err(e) => {
                        let at = t.ca.as_ref().map_or(cl.name.referenced, |ca| ca.referenced);
                        c.err(&at, format!("clusters[{name}].tls: {e}"));
                        None
                    }
                }
            }
        };
        let health_check = cl.health_check.as_ref().map(|h| HealthCheckSpec {
            path: h.path.clone().unwrap_or_else(|| "/healthz".into()),
            interval: or(h.interval, Duration::from_secs(5)),
            timeout: or(h.timeout, Duration::from_secs(1)),
            healthy_threshold: h.healthy_threshold.unwrap_or(1),
            unhealthy_threshold: h.unhealthy_threshold.unwrap_or(2),
        });
        if let Some(h) = &health_check {
            if !h.path.starts_with('/') {
                c.err(
                    &cl.name.referenced,
                    format!("clusters[{name}].health_check.path: must start with `/`"),
                );
            }
            if h.interval.is_zero() {
                c.err(
                    &cl.name.referenced,
                    format!("clusters[{name}].health_check.interval: must be positive"),
                );
            }
        }
        let outlier = cl.outlier_detection.as_ref().map(|o| OutlierSpec {
            consecutive_5xx: o.consecutive_5xx.unwrap_or(5),
            consecutive_gateway_errors: o.consecutive_gateway_errors.unwrap_or(5),
            base_ejection_time: or(o.base_ejection_time, Duration::from_secs(30)),
            max_ejection_percent: o.max_ejection_percent.unwrap_or(10).min(100),
        });
        let cb = &cl.circuit_breakers;
        let spec = ClusterSpec {
            name: name.clone(),
            endpoints,
            subsets,
            policy,
            http2,
            connect_timeout: or(cl.connect_timeout, Duration::from_secs(5)),
            idle_timeout: or(cl.idle_timeout, Duration::from_secs(60)),
            max_idle_per_endpoint: cl.max_idle_per_endpoint.unwrap_or(64),
            tls,
            dns_refresh: or(cl.dns_refresh, Duration::from_secs(5)).max(Duration::from_millis(100)),
            health_check,
            outlier,
            max_connections: cb.max_connections.unwrap_or(1024),
            max_pending_requests: cb.max_pending_requests.unwrap_or(1024),
            max_requests: cb.max_requests.unwrap_or(1024),
        };
        let fingerprint = json
            .get("clusters")
            .and_then(|v| v.get(i))
            .map(|v| v.to_string())
            .unwrap_or_default();
        clusters.push((spec, fingerprint));
    }

    // Listeners.
    let mut listeners = Vec::new();
    let mut listener_names = HashSet::new();
    let mut tcp_listeners = HashSet::new();
    let mut addresses = HashSet::new();
    for l in &cfg.listeners {
        let name = l.name.value.clone();
        if !listener_names.insert(name.clone()) {
            c.err(
                &l.name.referenced,
                format!("listeners[].name: duplicate listener name `{name}`"),
            );
        }
        let Some(address) = c.socket_addr(&l.address, &format!("listeners[{name}].address")) else {
            continue;
        };
        if address.port() != 0 && !addresses.insert(address) {
            c.err(
                &l.address.referenced,
                format!("listeners[{name}].address: `{address}` is used by another listener"),
            );
        }
        let tls = match &l.tls {
            None => None,
            Some(t) => {
                if t.certificates.is_empty() {
                    c.err(
                        &l.name.referenced,
                        format!(
                            "listeners[{name}].tls.certificates: at least one certificate is needed"
                        ),
                    );
                }
                let mut named = Vec::new();
                for cert in &t.certificates {
                    let names: Vec<String> =
                        cert.server_names.iter().map(|n| n.value.clone()).collect();
                    match crate::tls::load_certified_key(
                        &path_of(&cert.cert.value),
                        &path_of(&cert.key.value),
                        &names,
                    ) {
                        Ok(nc) => named.push(nc),
                        Err(e) => c.err(
                            &cert.cert.referenced,
                            format!("listeners[{name}].tls.certificates[].cert: {e}"),
                        ),
                    }
                }
                crate::tls::SniResolver::new(named).and_then(|r| {
                    match crate::tls::server_config(r) {
                        // A TCP listener proxies bytes: it offers no application protocol.
                        Ok(cfg) if is_tcp(l) => {
                            let mut cfg = (*cfg).clone();
                            cfg.alpn_protocols.clear();
                            Some(Arc::new(cfg))
                        }
                        Ok(cfg) => Some(cfg),
                        Err(e) => {
                            c.err(&l.name.referenced, format!("listeners[{name}].tls: {e}"));
                            None
                        }
                    }
                })
            }
        };
        let d = Limits::default();
        let lim = &l.limits;
        let limits = Limits {
            max_request_headers_bytes: lim
                .max_request_headers_bytes
                .unwrap_or(d.max_request_headers_bytes),
            max_request_headers: lim.max_request_headers.unwrap_or(d.max_request_headers),
            request_header_timeout: or(lim.request_header_timeout, d.request_header_timeout),
            idle_timeout: or(lim.idle_timeout, d.idle_timeout),
            max_connections: lim.max_connections.unwrap_or(d.max_connections),
            max_concurrent_streams: lim
                .max_concurrent_streams
                .unwrap_or(d.max_concurrent_streams),
            allow_underscores_in_headers: lim.allow_underscores_in_headers.unwrap_or(false),
        };
        if limits.request_header_timeout.is_zero() {
            c.err(
                &l.name.referenced,
                format!("listeners[{name}].limits.request_header_timeout: must be positive"),
            );
        }
        if limits.max_request_headers == 0
            || limits.max_concurrent_streams == 0
            || limits.max_connections == 0
        {
            c.err(
                &l.name.referenced,
                format!("listeners[{name}].limits: limits must be positive"),
            );
        }
        let tcp = check_tcp_proxy(&mut c, l, &cfg.clusters);
        if tcp.is_some() {
            tcp_listeners.insert(name.clone());
        }
        listeners.push(ListenerSpec {
            name: name.as_str().into(),
            address,
            tls,
            proxy_protocol: l.proxy_protocol,
            limits,
            tcp,
        });
    }

    let plugin_names: HashSet<String> = cfg.plugins.iter().map(|p| p.name.value.clone()).collect();

    // Routes.
    let mut routes = Vec::new();
    let mut route_names = HashSet::new();
    for (i, r) in cfg.routes.iter().enumerate() {
        let name = r.name.value.clone();
        let at = r.name.referenced;
        if name.is_empty() {
            c.err(&at, "routes[].name: must not be empty");
        }
        if !route_names.insert(name.clone()) {
            c.err(&at, format!("routes[].name: duplicate route name `{name}`"));
        }
        for l in &r.listeners {
            if !listener_names.contains(&l.value) {
                c.err(
                    &l.referenced,
                    format!("routes[{name}].listeners: unknown listener `{}`", l.value),
                );
            } else if tcp_listeners.contains(&l.value) {
                c.err(
                    &l.referenced,
                    format!(
                        "routes[{name}].listeners: `{}` is a tcp listener; routes apply to http listeners",
                        l.value
                    ),
                );
            }
        }
        let mut hosts = Vec::new();
        for h in &r.hosts {
            match HostPattern::parse(&h.value) {
                Ok(p) => hosts.push(p),
                Err(e) => c.err(&h.referenced, format!("routes[{name}].hosts: {e}")),
            }
        }
        if r.hosts.is_empty() {
            hosts.push(HostPattern::Any);
        }
        let m = &r.matches;
        let path = match &m.path {
            None => PathCond::Any,
            Some(p) => match (&p.exact, &p.prefix, &p.regex) {
                (Some(e), None, None) => {
                    check_path(&mut c, e, &name);
                    PathCond::Exact(e.value.clone())
                }
                (None, Some(pfx), None) => {
                    check_path(&mut c, pfx, &name);
                    PathCond::Prefix(pfx.value.clone())
                }
                (None, None, Some(re)) => c
                    .regex(re, &format!("routes[{name}].match.path.regex"))
                    .map_or(PathCond::Any, PathCond::Regex),
                _ => {
                    c.err(
                        &at,
                        format!(
                            "routes[{name}].match.path: set exactly one of exact, prefix, regex"
                        ),
                    );
                    PathCond::Any
                }
            },
        };
        let mut headers = Vec::new();
        for h in &m.headers {
            let field = format!("routes[{name}].match.headers[{}]", h.name.value);
            let Some(hn) = c.header_name(&h.name.referenced, &h.name.value, &field) else {
                continue;
            };
            if let Some(cond) = value_cond(
                &mut c,
                &h.name.referenced,
                &field,
                h.exact.as_ref(),
                h.prefix.as_ref(),
                h.regex.as_ref(),
                h.present,
            ) {
                headers.push((hn, cond));
            }
        }
        let mut query = Vec::new();
        for q in &m.query {
            let field = format!("routes[{name}].match.query[{}]", q.name.value);
            if let Some(cond) = value_cond(
                &mut c,
                &q.name.referenced,
                &field,
                q.exact.as_ref(),
                None,
                q.regex.as_ref(),
                q.present,
            ) {
                query.push((q.name.value.clone(), cond));
            }
        }
        let mut methods = Vec::new();
        for meth in &m.methods {
            match Method::from_bytes(meth.value.to_ascii_uppercase().as_bytes()) {
                Ok(mm) => methods.push(mm),
                Err(_) => c.err(
                    &meth.referenced,
                    format!(
                        "routes[{name}].match.methods: invalid method `{}`",
                        meth.value
                    ),
                ),
            }
        }
        let conditions = Conditions {
            path,
            headers,
            query,
            methods,
        };

        let kinds = usize::from(!r.backends.is_empty())
            + usize::from(r.redirect.is_some())
            + usize::from(r.direct_response.is_some());
        if kinds != 1 {
            c.err(
                &at,
                format!("routes[{name}]: set exactly one of backends, redirect, direct_response"),
            );
        }
        let action = if let Some(rd) = &r.redirect {
            let code = match &rd.code {
                None => StatusCode::FOUND,
                Some(code) => match code.value {
                    301 | 302 | 303 | 307 | 308 => {
                        StatusCode::from_u16(code.value).expect("valid redirect code")
                    }
                    other => {
                        c.err(&code.referenced, format!("routes[{name}].redirect.code: {other} is not a redirect code (301, 302, 303, 307, 308)"));
                        StatusCode::FOUND
                    }
                },
            };
            if let Some(s) = &rd.scheme
                && s.value != "http"
                && s.value != "https"
            {
                c.err(
                    &s.referenced,
                    format!("routes[{name}].redirect.scheme: expected http or https"),
                );
            }
            PendingAction::Redirect(RedirectAction {
                scheme: rd.scheme.as_ref().map(|s| s.value.clone()),
                host: rd.host.clone(),
                port: rd.port,
                path: rd.path.clone(),
                code,
            })
        } else if let Some(d) = &r.direct_response {
            let status = match StatusCode::from_u16(d.status.value) {
                Ok(s) if (200..600).contains(&d.status.value) => s,
                _ => {
                    c.err(
                        &d.status.referenced,
                        format!(
                            "routes[{name}].direct_response.status: {} is not a valid status",
                            d.status.value
                        ),
                    );
                    StatusCode::OK
                }
            };
            let content_type = match (&d.content_type, d.body.is_empty()) {
                (Some(ct), _) => HeaderValue::from_str(ct).ok(),
                (None, false) => Some(HeaderValue::from_static("text/plain")),
                (None, true) => None,
            };
            PendingAction::Direct {
                status,
                body: bytes::Bytes::from(d.body.clone()),
                content_type,
            }
        } else {
            let mut backends = Vec::new();
            let mut total = 0u64;
            for b in &r.backends {
                let weight = b.weight.as_ref().map_or(1, |w| w.value);
                total += u64::from(weight);
                match cluster_names.get(&b.cluster.value) {
                    None => c.err(
                        &b.cluster.referenced,
                        format!(
                            "routes[{name}].backends[].cluster: unknown cluster `{}`",
                            b.cluster.value
                        ),
                    ),
                    Some(subsets) => {
                        let subset = match &b.subset {
                            None => None,
                            Some(s) => match subsets.iter().position(|n| *n == s.value) {
                                Some(idx) => Some(idx),
                                None => {
                                    c.err(&s.referenced, format!("routes[{name}].backends[].subset: cluster `{}` has no subset `{}`", b.cluster.value, s.value));
                                    None
                                }
                            },
                        };
                        backends.push((b.cluster.value.clone(), subset, weight));
                    }
                }
            }
            if !r.backends.is_empty() && total == 0 {
                let at = r.backends[0].weight.as_ref().map_or(at, |w| w.referenced);
                c.err(
                    &at,
                    format!("routes[{name}].backends[].weight: weights sum to 0"),
                );
            }
            PendingAction::Proxy(backends)
        };
        let request_headers = header_edits(
            &mut c,
            &at,
            &r.request_headers,
            &format!("routes[{name}].request_headers"),
        );
        let response_headers = header_edits(
            &mut c,
            &at,
            &r.response_headers,
            &format!("routes[{name}].response_headers"),
        );
        let mut rewrite = Rewrite::default();
        if let Some(rw) = &r.rewrite {
            if let Some(p) = &rw.prefix {
                match &m.path.as_ref().and_then(|p| p.prefix.as_ref()) {
                    Some(from) => rewrite.prefix = Some((from.value.clone(), p.value.clone())),
                    None => c.err(
                        &p.referenced,
                        format!("routes[{name}].rewrite.prefix: needs `match.path.prefix`"),
                    ),
                }
            }
            if let Some(re) = &rw.regex
                && let Some(r) = c.regex(
                    &re.pattern,
                    &format!("routes[{name}].rewrite.regex.pattern"),
                )
            {
                // Unanchored for substitution: strip the anchors `regex()` added.
                let unanchored = Regex::new(&re.pattern.value).unwrap_or(r);
                rewrite.regex = Some((unanchored, re.substitution.clone()));
            }
            if rewrite.prefix.is_some() && rewrite.regex.is_some() {
                c.err(
                    &at,
                    format!("routes[{name}].rewrite: set prefix or regex, not both"),
                );
            }
            if let Some(h) = &rw.host {
                match HeaderValue::from_str(h) {
                    Ok(v) => rewrite.host = Some(v),
                    Err(_) => c.err(
                        &at,
                        format!("routes[{name}].rewrite.host: invalid host `{h}`"),
                    ),
                }
            }
        }
        let timeout = match r.timeout {
            None => Some(Duration::from_secs(15)),
            Some(d) if d.0.is_zero() => None,
            Some(d) => Some(d.0),
        };
        let mut retry = RetryPolicy::default();
        if let Some(rt) = &r.retries {
            retry.attempts = rt.attempts.unwrap_or(1);
            if rt.on.is_empty() {
                retry.on = RetryOn {
                    connect_failure: true,
                    refused_stream: true,
                    gateway_error: true,
                    ..Default::default()
                };
            }
            for cond in &rt.on {
                if let Err(e) = retry.on.add(&cond.value) {
                    c.err(&cond.referenced, format!("routes[{name}].retries.on: {e}"));
                }
            }
            retry.on.status_codes = rt.status_codes.clone();
            retry.per_try_timeout = rt.per_try_timeout.map(|d| d.0).filter(|d| !d.is_zero());
            retry.backoff_base = or(rt.backoff_base, Duration::from_millis(25));
            retry.backoff_max = or(rt.backoff_max, retry.backoff_base * 10);
            retry.budget_percent = rt.budget_percent.unwrap_or(20.0).clamp(0.0, 100.0);
        }
        let rate_limit = match &r.rate_limit {
            None => None,
            Some(rl) => {
                let key = match rl.key.as_ref().map(|k| k.value.as_str()) {
                    None | Some("client_ip") => Some(Key::ClientIp),
                    Some("route") => Some(Key::Route),
                    Some(k) => match k.strip_prefix("header:") {
                        Some(h) => c
                            .header_name(
                                &rl.requests.referenced,
                                h,
                                &format!("routes[{name}].rate_limit.key"),
                            )
                            .map(Key::Header),
                        None => {
                            let at = rl.key.as_ref().map_or(at, |k| k.referenced);
                            c.err(&at, format!("routes[{name}].rate_limit.key: `{k}`: expected client_ip, route or header:NAME"));
                            None
                        }
                    },
                };
                let per = or(rl.per, Duration::from_secs(1));
                match (NonZeroU32::new(rl.requests.value), key) {
                    (Some(n), Some(key)) if !per.is_zero() => {
                        let burst = NonZeroU32::new(rl.burst.unwrap_or(n.get())).unwrap_or(n);
                        let fp = json
                            .get("routes")
                            .and_then(|v| v.get(i))
                            .and_then(|v| v.get("rate_limit"))
                            .map(|v| v.to_string())
                            .unwrap_or_default();
                        Some((n, per, burst, key, fp))
                    }
                    (None, _) => {
                        c.err(
                            &rl.requests.referenced,
                            format!("routes[{name}].rate_limit.requests: must be positive"),
                        );
                        None
                    }
                    _ => None,
                }
            }
        };
        let mut chain_errors = Vec::new();
        let filters = check_chain(
            &r.filters,
            &plugin_names,
            at,
            &format!("routes[{name}].filters"),
            &mut chain_errors,
        );
        for (loc, msg) in chain_errors {
            c.err(&loc, msg);
        }
        routes.push(PendingRoute {
            filters,
            name,
            listeners: r.listeners.iter().map(|l| l.value.clone()).collect(),
            hosts,
            conditions,
            action,
            request_headers,
            response_headers,
            rewrite,
            timeout,
            retry,
            rate_limit,
        });
    }

    // Plugins and the listeners' filter chains.
    let cache_dir = cfg
        .server
        .cache_dir
        .as_ref()
        .map_or_else(crate::filter::module::default_cache_dir, |d| {
            std::path::PathBuf::from(path_of(d))
        });
    let mut plugin_errors = Vec::new();
    let module_ca = cfg
        .server
        .module_ca
        .as_ref()
        .map(|p| std::path::PathBuf::from(path_of(p)));
    let sources = crate::filter::module::Sources {
        base_dir,
        cache_dir: &cache_dir,
        ca_file: module_ca.as_deref(),
    };
    let plugins = check_plugins(
        &cfg.plugins,
        &json,
        &route_names,
        &sources,
        &mut plugin_errors,
    );
    let mut listener_filters = Vec::new();
    for l in &cfg.listeners {
        let chain = check_chain(
            &l.filters,
            &plugin_names,
            l.name.referenced,
            &format!("listeners[{}].filters", l.name.value),
            &mut plugin_errors,
        );
        listener_filters.push((Arc::<str>::from(l.name.value.as_str()), chain));
    }
    for (loc, msg) in plugin_errors {
        c.err(&loc, msg);
    }

    // Access log.
    let access_log = if cfg.access_log.enabled {
        let al = &cfg.access_log;
        let format = match (&al.format, &al.json) {
            (Some(_), Some(_)) => {
                let at = al
                    .format
                    .as_ref()
                    .map(|f| f.referenced)
                    .unwrap_or(Location::UNKNOWN);
                c.err(&at, "access_log: set format or json, not both");
                None
            }
            (_, Some(fields)) => {
                match Format::json(fields.iter().map(|(k, v)| (k.as_str(), v.value.as_str()))) {
                    Ok(f) => Some(f),
                    Err(e) => {
                        let at = fields
                            .values()
                            .next()
                            .map(|v| v.referenced)
                            .unwrap_or(Location::UNKNOWN);
                        c.err(&at, format!("access_log.json: {e}"));
                        None
                    }
                }
            }
            (Some(f), None) => match Format::text(&f.value) {
                Ok(fm) => Some(fm),
                Err(e) => {
                    c.err(&f.referenced, format!("access_log.format: {e}"));
                    None
                }
            },
            (None, None) => {
                Some(Format::text(DEFAULT_FORMAT).expect("the default format is valid"))
            }
        };
        let path = al
            .path
            .clone()
            .map(|p| {
                if p == "stdout" || p == "-" {
                    p
                } else {
                    path_of(&p)
                }
            })
            .unwrap_or_else(|| "stdout".into());
        format.map(|f| (f, path, al.buffer_lines.unwrap_or(65536)))
    } else {
        None
    };

    let admin = if cfg.admin.address.value.is_empty() {
        None
    } else {
        c.socket_addr(&cfg.admin.address, "admin.address")
    };

    let mut demo_backends = Vec::new();
    for d in &cfg.demo_backends {
        if let Some(address) = c.socket_addr(
            &d.address,
            &format!("demo_backends[{}].address", d.name.value),
        ) {
            demo_backends.push(DemoSpec {
                name: d.name.value.clone(),
                address,
                body: d.body.clone(),
                status: d.status.unwrap_or(200),
            });
        }
    }

    if c.errors.is_empty() {
        Ok(Checked {
            clusters,
            routes,
            listeners,
            access_log,
            admin,
            demo_backends,
            drain_timeout: or(cfg.server.drain_timeout, Duration::from_secs(30)),
            watch: cfg.server.watch.unwrap_or(true),
            config_json: json,
            plugins,
            listener_filters,
            cache_dir,
            file: file.to_string(),
        })
    } else {
        c.errors.sort_by_key(|e| (e.line, e.column));
        Err(ConfigErrors(c.errors))
    }
}

/// Whether a listener is declared `protocol: tcp`.
fn is_tcp(l: &schema::Listener) -> bool {
    l.protocol.as_ref().is_some_and(|p| p.value == "tcp")
}

/// Check a listener's `protocol` and `tcp_proxy`; the TCP proxy spec of a `tcp` listener.
fn check_tcp_proxy(
    c: &mut Checker<'_>,
    l: &schema::Listener,
    clusters: &[schema::Cluster],
) -> Option<TcpProxySpec> {
    let name = &l.name.value;
    let protocol = l
        .protocol
        .as_ref()
        .map(|p| (p.value.as_str(), p.referenced));
    match protocol {
        None | Some(("http", _)) => {
            if let Some(t) = &l.tcp_proxy {
                c.err(
                    &t.cluster.referenced,
                    format!("listeners[{name}].tcp_proxy: only for `protocol: tcp` listeners"),
                );
            }
            None
        }
        Some(("tcp", at)) => {
            let lim = &l.limits;
            if lim.max_request_headers_bytes.is_some()
                || lim.max_request_headers.is_some()
                || lim.max_concurrent_streams.is_some()
                || lim.allow_underscores_in_headers.is_some()
            {
                c.err(
                    &l.name.referenced,
                    format!(
                        "listeners[{name}].limits: max_request_headers_bytes, max_request_headers, max_concurrent_streams and allow_underscores_in_headers apply to http listeners only"
                    ),
                );
            }
            let Some(t) = &l.tcp_proxy else {
                c.err(
                    &at,
                    format!("listeners[{name}].tcp_proxy: required with `protocol: tcp`"),
                );
                return None;
            };
            let cluster = &t.cluster;
            match clusters.iter().find(|cl| cl.name.value == cluster.value) {
                None => c.err(
                    &cluster.referenced,
                    format!(
                        "listeners[{name}].tcp_proxy.cluster: unknown cluster `{}`",
                        cluster.value
                    ),
                ),
                Some(cl) if cl.tls.is_some() => c.err(
                    &cluster.referenced,
                    format!(
                        "listeners[{name}].tcp_proxy.cluster: cluster `{}` has `tls`, which tcp_proxy does not support (TLS to upstreams is HTTP-only)",
                        cluster.value
                    ),
                ),
                Some(_) => {}
            }
            Some(TcpProxySpec {
                cluster: cluster.value.clone(),
            })
        }
        Some((other, at)) => {
            c.err(
                &at,
                format!(
                    "listeners[{name}].protocol: unknown protocol `{other}`: expected http or tcp"
                ),
            );
            None
        }
    }
}

fn check_path(c: &mut Checker<'_>, p: &S<String>, route: &str) {
    if !p.value.starts_with('/') {
        c.err(
            &p.referenced,
            format!(
                "routes[{route}].match.path: `{}` must start with `/`",
                p.value
            ),
        );
    }
}

fn split_host_port(s: &str) -> Option<(String, u16)> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Some((addr.ip().to_string(), addr.port()));
    }
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    if host.is_empty() || host.contains(['/', ' ', '[', ']']) {
        return None;
    }
    Some((host.to_string(), port))
}

fn parse_hash_on(s: &str) -> Option<HashOn> {
    if s == "source_ip" {
        return Some(HashOn::SourceIp);
    }
    if let Some(h) = s.strip_prefix("header:") {
        return HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
            .ok()
            .map(HashOn::Header);
    }
    s.strip_prefix("cookie:")
        .filter(|c| !c.is_empty())
        .map(|c| HashOn::Cookie(c.to_string()))
}

#[allow(clippy::too_many_arguments)]
fn value_cond(
    c: &mut Checker<'_>,
    at: &Location,
    field: &str,
    exact: Option<&String>,
    prefix: Option<&String>,
    regex: Option<&S<String>>,
    present: Option<bool>,
) -> Option<ValueCond> {
    let n =
        usize::from(exact.is_some()) + usize::from(prefix.is_some()) + usize::from(regex.is_some());
    if n > 1 || (n == 1 && present.is_some()) {
        c.err(
            at,
            format!("{field}: set at most one of exact, prefix, regex, present"),
        );
        return None;
    }
    Some(match (exact, prefix, regex, present) {
        (Some(e), _, _, _) => ValueCond::Exact(e.clone()),
        (_, Some(p), _, _) => ValueCond::Prefix(p.clone()),
        (_, _, Some(r), _) => ValueCond::Regex(c.regex(r, field)?),
        (_, _, _, Some(false)) => ValueCond::Absent,
        _ => ValueCond::Present,
    })
}

fn header_edits(
    c: &mut Checker<'_>,
    at: &Location,
    e: &schema::HeaderEdits,
    field: &str,
) -> HeaderEdits {
    let mut out = HeaderEdits::default();
    let pair = |c: &mut Checker<'_>, k: &str, v: &str| -> Option<(HeaderName, HeaderValue)> {
        let name = c.header_name(at, k, field)?;
        match HeaderValue::from_str(v) {
            Ok(v) => Some((name, v)),
            Err(_) => {
                c.err(at, format!("{field}: invalid value for `{k}`"));
                None
            }
        }
    };
    for (k, v) in &e.add {
        out.add.extend(pair(c, k, v));
    }
    for (k, v) in &e.set {
        out.set.extend(pair(c, k, v));
    }
    for k in &e.remove {
        out.remove.extend(c.header_name(at, k, field));
    }
    out
}

impl Checked {
    /// Start every plugin once, as `weir run` would (each VM runs `on_vm_start`, each root
    /// context `on_configure`, also for per-route and per-host configurations), and drop them:
    /// a filter that rejects its configuration fails here with the plugin's location. The
    /// compile cache (under `server.cache_dir`) is shared with `weir run`. Must run inside the
    /// tokio runtime.
    pub fn start_plugins(self) -> Result<(), ConfigErrors> {
        if self.plugins.is_empty() {
            return Ok(());
        }
        let config = weir_wasm_host::EngineConfig {
            cache_dir: Some(self.cache_dir.join("wasm")),
            ..Default::default()
        };
        // Validation may run where the cache directory cannot be written: compile without it.
        let engine = weir_wasm_host::Engine::new(config)
            .or_else(|_| weir_wasm_host::Engine::new(weir_wasm_host::EngineConfig::default()))
            .map_err(|e| ConfigErrors::one(&self.file, 0, 0, format!("wasm engine: {e}")))?;
        let plugins = instantiate_plugins(
            self.plugins,
            &BTreeMap::new(),
            Some(&engine),
            &std::sync::Weak::new(),
            &self.file,
        )?;
        drop(plugins);
        Ok(())
    }

    /// Start clusters (reusing those of `previous` whose config is unchanged), build the route
    /// tables and the access log. Must run inside the tokio runtime. Clusters keep a connection
    /// pool per worker (`workers` of them).
    pub fn instantiate(
        self,
        previous: &Snapshot,
        registry: &Arc<Registry>,
        version: u64,
        engine: Option<&weir_wasm_host::Engine>,
        shared: &std::sync::Weak<crate::Shared>,
        workers: usize,
    ) -> Result<Snapshot, ConfigErrors> {
        let plugins =
            instantiate_plugins(self.plugins, &previous.plugins, engine, shared, &self.file)?;
        let mut listener_filters = HashMap::new();
        for (name, chain) in &self.listener_filters {
            if !chain.is_empty() {
                listener_filters.insert(name.clone(), links(chain, &plugins, &self.file)?);
            }
        }
        let mut clusters = BTreeMap::new();
        for (spec, fingerprint) in self.clusters {
            let cluster = match previous.clusters.get(&spec.name) {
                Some(old) if old.fingerprint == fingerprint => old.clone(),
                _ => {
                    let stats = registry.cluster(&spec.name);
                    Cluster::start(spec, stats, fingerprint, workers)
                }
            };
            clusters.insert(cluster.name.to_string(), cluster);
        }
        let previous_routes: HashMap<&str, &Arc<Route>> = previous
            .tables
            .values()
            .flat_map(|t| t.routes())
            .map(|r| (&*r.name, r))
            .collect();
        let mut built: Vec<(Vec<String>, Vec<HostPattern>, Arc<Route>)> = Vec::new();
        for p in self.routes {
            let action = match p.action {
                PendingAction::Proxy(backends) => Action::Proxy(WeightedBackends::new(
                    backends
                        .into_iter()
                        .map(|(cluster, subset, weight)| Backend {
                            cluster: clusters[&cluster].clone(),
                            subset,
                            weight,
                        })
                        .collect(),
                )),
                PendingAction::Redirect(r) => Action::Redirect(r),
                PendingAction::Direct {
                    status,
                    body,
                    content_type,
                } => Action::Direct {
                    status,
                    body,
                    content_type,
                },
            };
            let rate_limit =
                p.rate_limit.and_then(|(n, per, burst, key, fp)| {
                    match previous_routes
                        .get(p.name.as_str())
                        .and_then(|r| r.rate_limit.as_ref())
                    {
                        Some(old) if old.fingerprint == fp => Some(old.clone()),
                        _ => RouteRateLimiter::new(n, per, burst, key, fp).map(Arc::new),
                    }
                });
            let route = Route {
                stats: registry.route(&p.name),
                name: p.name.as_str().into(),
                conditions: p.conditions,
                action,
                request_headers: p.request_headers,
                response_headers: p.response_headers,
                rewrite: p.rewrite,
                timeout: p.timeout,
                retry: p.retry,
                rate_limit,
                filters: links(&p.filters, &plugins, &self.file)?,
            };
            built.push((p.listeners, p.hosts, Arc::new(route)));
        }
        let mut tables = HashMap::new();
        for l in self.listeners.iter().filter(|l| l.tcp.is_none()) {
            let routes: Vec<(Vec<HostPattern>, Arc<Route>)> = built
                .iter()
                .filter(|(ls, _, _)| ls.is_empty() || ls.iter().any(|n| **n == *l.name))
                .map(|(_, h, r)| (h.clone(), r.clone()))
                .collect();
            tables.insert(l.name.clone(), Arc::new(RouteTable::new(&routes)));
        }
        let access_log = match self.access_log {
            None => None,
            Some((format, path, buffer)) => {
                match AccessLog::start(format, &path, buffer, registry.clone()) {
                    Ok(log) => Some(Arc::new(log)),
                    Err(e) => {
                        return Err(ConfigErrors(vec![ConfigError {
                            file: String::new(),
                            line: 0,
                            column: 0,
                            message: format!("access_log.path: {e}"),
                        }]));
                    }
                }
            }
        };
        let route_names: Vec<&str> = built.iter().map(|(_, _, r)| &*r.name).collect();
        let cluster_names: Vec<&str> = clusters.keys().map(String::as_str).collect();
        registry.retain(&route_names, &cluster_names);
        let tcp_names: Vec<&str> = self
            .listeners
            .iter()
            .filter(|l| l.tcp.is_some())
            .map(|l| &*l.name)
            .collect();
        registry.retain_tcp(&tcp_names);
        Ok(Snapshot {
            version,
            tables,
            listeners: self.listeners,
            clusters,
            access_log,
            admin: self.admin,
            demo_backends: self.demo_backends,
            drain_timeout: self.drain_timeout,
            watch: self.watch,
            config_json: self.config_json,
            plugins,
            listener_filters,
            cache_dir: self.cache_dir,
        })
    }

    /// Whether the config declares plugins (and so needs the wasm engine).
    pub fn has_plugins(&self) -> bool {
        !self.plugins.is_empty()
    }

    /// The cache directory for compiled and downloaded modules.
    pub fn cache_dir(&self) -> &std::path::Path {
        &self.cache_dir
    }

    /// The admin address this config declares.
    pub fn admin(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// The listeners this config declares.
    pub fn listeners(&self) -> &[ListenerSpec] {
        &self.listeners
    }
}
