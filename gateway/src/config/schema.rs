//! The configuration file format: what users write, as serde types.
//!
//! The shape follows the Kubernetes Gateway API and Istio (VirtualService, DestinationRule) so that
//! platform teams keep their vocabulary. Every field is documented with its default; unknown fields
//! are errors. Values that must be checked against the rest of the file (names, references,
//! addresses, patterns, files) are `Spanned` so that errors can name their line and column.
//!
//! This module only describes the file. `compile.rs` turns it into the immutable tables the
//! request path reads.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer};
use serde_saphyr::Location;

use super::duration::Duration;

/// A value with its position in the file, so that checks can name the line and column.
#[derive(Debug, Clone)]
pub struct S<T> {
    /// The value.
    pub value: T,
    /// Where it was written (`Location::UNKNOWN` for defaults).
    pub referenced: Location,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for S<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spanned = serde_saphyr::Spanned::<T>::deserialize(deserializer)?;
        Ok(S {
            value: spanned.value,
            referenced: spanned.referenced,
        })
    }
}

impl<T: JsonSchema> JsonSchema for S<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        T::schema_name()
    }

    fn schema_id() -> std::borrow::Cow<'static, str> {
        T::schema_id()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        T::json_schema(generator)
    }
}

/// The whole configuration file.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The admin listener (health, metrics, config dump, reload). Default: `127.0.0.1:9901`.
    #[serde(default)]
    pub admin: Admin,
    /// Where traffic is accepted. Default: none.
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// The route table, matched in order: the first route that matches serves the request.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Upstream clusters that routes send traffic to.
    #[serde(default)]
    pub clusters: Vec<Cluster>,
    /// The access log. Default: off.
    #[serde(default)]
    pub access_log: AccessLog,
    /// Built-in demo upstreams that Weir serves itself on loopback (for the quickstart and for
    /// trying configs without other processes). Default: none.
    #[serde(default)]
    pub demo_backends: Vec<DemoBackend>,
    /// Process-wide settings.
    #[serde(default)]
    pub server: Server,
    /// proxy-wasm plugins (filters), referenced by name from `listeners[].filters` and
    /// `routes[].filters`. Default: none.
    #[serde(default)]
    pub plugins: Vec<Plugin>,
}

/// Process-wide settings.
#[derive(Debug, Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// How long graceful shutdown waits for in-flight requests. Default: `30s`.
    pub drain_timeout: Option<Duration>,
    /// Watch the config file and reload when it changes. Default: `true`.
    pub watch: Option<bool>,
    /// Directory of the on-disk cache of compiled wasm modules and downloaded modules.
    /// Default: `$XDG_CACHE_HOME/weir` or `$HOME/.cache/weir`.
    pub cache_dir: Option<String>,
    /// PEM file of the CA certificates trusted when downloading `https://` plugin modules.
    /// Default: the system bundle `/etc/ssl/certs/ca-certificates.crt`.
    pub module_ca: Option<String>,
}

/// The admin listener.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Address to listen on. Default: `127.0.0.1:9901`. An empty string disables the admin listener.
    #[serde(default = "default_admin_address")]
    pub address: S<String>,
}

fn default_admin_address() -> S<String> {
    unspanned("127.0.0.1:9901".to_string())
}

/// A value that did not come from the file (a default).
pub fn unspanned<T>(value: T) -> S<T> {
    S {
        value,
        referenced: Location::UNKNOWN,
    }
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            address: default_admin_address(),
        }
    }
}

/// A listener: an address where downstream clients connect.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Unique name, used in metrics, logs and `routes[].listeners`.
    pub name: S<String>,
    /// `IP:PORT` to bind, e.g. `0.0.0.0:8443`. Port 0 picks a free port.
    pub address: S<String>,
    /// What the listener serves: `http` (HTTP/1.1, HTTP/2 by ALPN, h2c; routed by `routes`) or
    /// `tcp` (every connection is proxied as bytes to `tcp_proxy.cluster`, Envoy's
    /// `tcp_proxy`). Default: `http`.
    pub protocol: Option<S<String>>,
    /// Where a `tcp` listener sends its connections. Required with `protocol: tcp`, not
    /// allowed otherwise.
    pub tcp_proxy: Option<TcpProxy>,
    /// Terminate TLS on this listener. Default: plain TCP (HTTP/1.1 and h2c prior knowledge).
    /// On a `tcp` listener, the decrypted bytes are proxied (no ALPN is offered).
    pub tls: Option<ListenerTls>,
    /// Expect a PROXY protocol header (v1 or v2) from a load balancer before each connection.
    /// Default: `false`.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Protection limits for downstream connections.
    #[serde(default)]
    pub limits: ListenerLimits,
    /// Filters (plugin names, or `{ plugin, config }` to override the configuration) run for
    /// every request on this listener, before the route's filters. On a `tcp` listener these
    /// are network filters, run for every connection (`proxy_on_new_connection`,
    /// `proxy_on_downstream_data`, ...): downstream bytes pass them in order, upstream bytes
    /// in reverse order. Default: none.
    #[serde(default)]
    pub filters: Vec<FilterRef>,
}

/// TCP proxying (Envoy's `tcp_proxy`): each downstream connection is connected to one
/// endpoint of the cluster, picked by its load balancer (skipping unhealthy and ejected
/// endpoints), with the cluster's `connect_timeout` and connection circuit breakers. The
/// connection closes after the listener's `limits.idle_timeout` without bytes in either
/// direction.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TcpProxy {
    /// The upstream cluster (plain TCP: a cluster with `tls` is not supported here).
    pub cluster: S<String>,
}

/// TLS termination settings.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// Certificates, chosen by SNI from each certificate's DNS names (exact first, then
    /// wildcard). The first certificate is served when the client sends no or an unknown SNI.
    pub certificates: Vec<Certificate>,
}

/// One certificate chain and its private key, PEM files.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    /// PEM certificate chain file, leaf first.
    pub cert: S<String>,
    /// PEM private key file (PKCS#8, PKCS#1 or SEC1).
    pub key: S<String>,
    /// Server names this certificate answers for. Default: the DNS names in the certificate.
    #[serde(default)]
    pub server_names: Vec<S<String>>,
}

/// Downstream protection limits. Defaults are as strict as Envoy's edge recommendations.
#[derive(Debug, Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenerLimits {
    /// Maximum total size of request headers (HTTP listeners only). Default: `60 KiB` (61440).
    pub max_request_headers_bytes: Option<usize>,
    /// Maximum number of request headers (HTTP listeners only). Default: `100`.
    pub max_request_headers: Option<usize>,
    /// Time allowed to receive a request's headers (slowloris protection); on every listener
    /// also the time allowed for the PROXY protocol header and the TLS handshake.
    /// Default: `10s`.
    pub request_header_timeout: Option<Duration>,
    /// Close a downstream connection idle for this long (HTTP: no request in flight; TCP: no
    /// bytes in either direction). Default: `300s`.
    pub idle_timeout: Option<Duration>,
    /// Maximum concurrent connections on this listener. Default: `100000`.
    pub max_connections: Option<usize>,
    /// HTTP/2 maximum concurrent streams per connection (HTTP listeners only). Default: `100`.
    pub max_concurrent_streams: Option<u32>,
    /// Accept header names containing `_` (HTTP listeners only). Default: `false` (rejected
    /// with 400, Envoy's edge setting).
    pub allow_underscores_in_headers: Option<bool>,
}

/// A route: which requests it matches and what it does with them.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Unique name, used in metrics, logs and `/config_dump`.
    pub name: S<String>,
    /// Listeners this route is served on. Default: all listeners.
    #[serde(default)]
    pub listeners: Vec<S<String>>,
    /// Hosts (the `Host`/`:authority` without port): exact (`api.example.com`), suffix wildcard
    /// (`*.example.com`) or `*`. Default: `["*"]`.
    #[serde(default)]
    pub hosts: Vec<S<String>>,
    /// What else must match. Default: everything matches.
    #[serde(default, rename = "match")]
    pub matches: RouteMatch,
    /// Weighted upstream backends (Istio VirtualService `route[].destination`). Exactly one of
    /// `backends`, `redirect` and `direct_response` is required.
    #[serde(default)]
    pub backends: Vec<Backend>,
    /// Answer with a redirect instead of proxying.
    pub redirect: Option<Redirect>,
    /// Answer with a fixed response instead of proxying.
    pub direct_response: Option<DirectResponse>,
    /// Rewrite the path or host before proxying.
    pub rewrite: Option<Rewrite>,
    /// Edit request headers sent upstream.
    #[serde(default)]
    pub request_headers: HeaderEdits,
    /// Edit response headers sent downstream.
    #[serde(default)]
    pub response_headers: HeaderEdits,
    /// Total time for the request, all retries included. `0s` disables it. Default: `15s`.
    pub timeout: Option<Duration>,
    /// Retry policy. Default: no retries.
    pub retries: Option<Retries>,
    /// Local rate limit. Default: none.
    pub rate_limit: Option<RateLimit>,
    /// Filters run for requests on this route, after the listener's. Default: none.
    #[serde(default)]
    pub filters: Vec<FilterRef>,
}

/// Request conditions, all of which must hold.
#[derive(Debug, Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// Path condition. Default: any path.
    pub path: Option<PathMatch>,
    /// Header conditions.
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
    /// Query parameter conditions.
    #[serde(default)]
    pub query: Vec<QueryMatch>,
    /// Allowed methods (`GET`, `POST`, ...). Default: any.
    #[serde(default)]
    pub methods: Vec<S<String>>,
}

/// A path condition: exactly one of the fields. The query string is not part of the path.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PathMatch {
    /// The path equals this.
    pub exact: Option<S<String>>,
    /// The path starts with this string (Envoy's `prefix`: `/api` also matches `/apix`; write
    /// `/api/` to match only below it).
    pub prefix: Option<S<String>>,
    /// The whole path matches this regular expression (RE2 syntax, anchored).
    pub regex: Option<S<String>>,
}

/// A header condition: `name` plus at most one of the value conditions. With none, the header
/// must be present.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    /// Header name, case-insensitive.
    pub name: S<String>,
    /// The value equals this.
    pub exact: Option<String>,
    /// The value starts with this.
    pub prefix: Option<String>,
    /// The whole value matches this regular expression.
    pub regex: Option<S<String>>,
    /// `true`: the header must be present; `false`: it must be absent. Default: `true`.
    pub present: Option<bool>,
}

/// A query-parameter condition: `name` plus at most one value condition.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QueryMatch {
    /// Parameter name (exact, case-sensitive).
    pub name: S<String>,
    /// The (percent-decoded) value equals this.
    pub exact: Option<String>,
    /// The whole value matches this regular expression.
    pub regex: Option<S<String>>,
    /// `true`: present; `false`: absent. Default: `true`.
    pub present: Option<bool>,
}

/// A weighted destination.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// Cluster name.
    pub cluster: S<String>,
    /// Subset of the cluster's endpoints (Istio DestinationRule subset). Default: all endpoints.
    pub subset: Option<S<String>>,
    /// Relative weight. Default: `1`.
    pub weight: Option<S<u32>>,
}

/// A redirect response. Unset parts keep the request's values.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    /// New scheme (`http` or `https`).
    pub scheme: Option<S<String>>,
    /// New host.
    pub host: Option<String>,
    /// New port.
    pub port: Option<u16>,
    /// New path (replaces the whole path; the query is kept).
    pub path: Option<String>,
    /// Status code: 301, 302, 303, 307 or 308. Default: `302`.
    pub code: Option<S<u16>>,
}

/// A fixed response.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DirectResponse {
    /// Status code.
    pub status: S<u16>,
    /// Body. Default: empty.
    #[serde(default)]
    pub body: String,
    /// `content-type` of the body. Default: `text/plain` when there is a body.
    pub content_type: Option<String>,
}

/// Path and host rewrites applied before proxying.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    /// Replace the matched `match.path.prefix` with this.
    pub prefix: Option<S<String>>,
    /// Regex rewrite of the path.
    pub regex: Option<RegexRewrite>,
    /// Replace the `Host`/`:authority` sent upstream.
    pub host: Option<String>,
}

/// A regex substitution (`$1`, `${name}` refer to groups).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegexRewrite {
    /// Pattern, RE2 syntax.
    pub pattern: S<String>,
    /// Replacement.
    pub substitution: String,
}

/// Header edits, applied in the order remove, set, add.
#[derive(Debug, Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderEdits {
    /// Headers appended (keeping existing values).
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Headers set (replacing existing values).
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Headers removed.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// Retry policy (Envoy `retry_policy`, Istio `retries`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Retries {
    /// Retries after the first attempt. Default: `1`.
    pub attempts: Option<u32>,
    /// Conditions: `connect-failure`, `refused-stream`, `reset`, `5xx`, `gateway-error`,
    /// `retriable-status-codes`. Default: `[connect-failure, refused-stream, gateway-error]`.
    #[serde(default)]
    pub on: Vec<S<String>>,
    /// Status codes retried with `retriable-status-codes`.
    #[serde(default)]
    pub status_codes: Vec<u16>,
    /// Timeout of each attempt. Default: none (the route timeout bounds all attempts).
    pub per_try_timeout: Option<Duration>,
    /// Base interval of the jittered exponential backoff. Default: `25ms`.
    pub backoff_base: Option<Duration>,
    /// Maximum backoff interval. Default: 10 × `backoff_base`.
    pub backoff_max: Option<Duration>,
    /// Retry budget: retries may be at most this percentage of active requests to the cluster
    /// (a minimum of 3 concurrent retries is always allowed). Default: `20`.
    pub budget_percent: Option<f64>,
}

/// A local rate limit (token bucket, per gateway process).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Requests allowed per `per`.
    pub requests: S<u32>,
    /// The period. Default: `1s`.
    pub per: Option<Duration>,
    /// Burst size. Default: `requests`.
    pub burst: Option<u32>,
    /// What a bucket is kept for: `client_ip` (default), `header:NAME`, or `route` (one bucket).
    pub key: Option<S<String>>,
}

/// An upstream cluster (Istio DestinationRule + ServiceEntry).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Unique name.
    pub name: S<String>,
    /// Endpoints. A host that is not an IP address is resolved by DNS and re-resolved every
    /// `dns_refresh`.
    pub endpoints: Vec<Endpoint>,
    /// How often DNS names are re-resolved. Default: `5s`.
    pub dns_refresh: Option<Duration>,
    /// Named subsets selected by endpoint labels.
    #[serde(default)]
    pub subsets: Vec<Subset>,
    /// Load balancing. Default: round robin.
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// Protocol to upstream: `http1` or `http2` (h2c, or h2 by ALPN with TLS). Default: `http1`.
    pub protocol: Option<S<String>>,
    /// TCP connect timeout. Default: `5s`.
    pub connect_timeout: Option<Duration>,
    /// Close pooled connections idle for this long. Default: `60s`.
    pub idle_timeout: Option<Duration>,
    /// Maximum idle pooled connections per endpoint in each worker's pool. Default: `64`.
    pub max_idle_per_endpoint: Option<usize>,
    /// TLS to upstream. Default: plain TCP.
    pub tls: Option<UpstreamTls>,
    /// Active HTTP health checking. Default: off.
    pub health_check: Option<HealthCheck>,
    /// Passive outlier detection. Default: off.
    pub outlier_detection: Option<OutlierDetection>,
    /// Circuit-breaker limits. Defaults: 1024 each (Envoy's).
    #[serde(default)]
    pub circuit_breakers: CircuitBreakers,
}

/// One upstream endpoint.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// `HOST:PORT`.
    pub address: S<String>,
    /// Labels, matched by subsets (e.g. `version: v1`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Load-balancing weight. Default: `1`.
    pub weight: Option<u32>,
}

/// A named subset of a cluster's endpoints.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Subset {
    /// Subset name, referenced by `routes[].backends[].subset`.
    pub name: S<String>,
    /// Endpoints whose labels include all of these.
    pub labels: BTreeMap<String, String>,
}

/// Load-balancing policy.
#[derive(Debug, Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancing {
    /// `round_robin`, `least_request` (power of two choices), `random` or `ring_hash`.
    /// Default: `round_robin`.
    pub policy: Option<S<String>>,
    /// What `ring_hash` hashes: `header:NAME`, `cookie:NAME` or `source_ip`. Default: `source_ip`.
    pub hash_on: Option<S<String>>,
}

/// TLS from Weir to the upstream.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// Server name sent in SNI and verified in the certificate. Default: the endpoint's host.
    pub sni: Option<String>,
    /// PEM file of CA certificates to trust. Default: the system's roots are not loaded; a CA
    /// is required unless `insecure_skip_verify` is set.
    pub ca: Option<S<String>>,
    /// Do not verify the upstream's certificate. Default: `false`.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// Active HTTP health checks.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Path requested. Default: `/healthz`.
    pub path: Option<String>,
    /// Interval between checks. Default: `5s`.
    pub interval: Option<Duration>,
    /// Timeout of one check. Default: `1s`.
    pub timeout: Option<Duration>,
    /// Successes before an unhealthy endpoint is healthy again. Default: `1`.
    pub healthy_threshold: Option<u32>,
    /// Failures before a healthy endpoint is unhealthy. Default: `2`.
    pub unhealthy_threshold: Option<u32>,
}

/// Passive outlier detection (Envoy `outlier_detection`, Istio `outlierDetection`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive 5xx responses that eject an endpoint. Default: `5`.
    pub consecutive_5xx: Option<u32>,
    /// Consecutive gateway errors (502, 503, 504, connect failures) that eject. Default: `5`.
    pub consecutive_gateway_errors: Option<u32>,
    /// Base ejection time, multiplied by the number of times the endpoint was ejected.
    /// Default: `30s`.
    pub base_ejection_time: Option<Duration>,
    /// Maximum percentage of endpoints ejected at once. Default: `10` (at least one endpoint may
    /// always be ejected).
    pub max_ejection_percent: Option<u32>,
}

/// Circuit-breaker limits. Past a limit the request fails fast with 503 and the `UO` flag.
#[derive(Debug, Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakers {
    /// Maximum connections to the whole cluster. Default: `1024`.
    pub max_connections: Option<usize>,
    /// Maximum requests waiting for a connection. Default: `1024`.
    pub max_pending_requests: Option<usize>,
    /// Maximum requests in flight to the cluster. Default: `1024`.
    pub max_requests: Option<usize>,
}

/// The access log.
#[derive(Debug, Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    /// Write the access log. Default: `false`.
    #[serde(default)]
    pub enabled: bool,
    /// `stdout` or a file path. Default: `stdout`.
    pub path: Option<String>,
    /// An Envoy format string (`%REQ(:METHOD)% %RESPONSE_CODE% ...`). Default: Envoy's default
    /// format.
    pub format: Option<S<String>>,
    /// Write JSON lines instead: a map of field name to format string (`{ "code":
    /// "%RESPONSE_CODE%" }`). Default: none.
    pub json: Option<BTreeMap<String, S<String>>>,
    /// Lines buffered before new ones are dropped (and counted). Default: `65536`.
    pub buffer_lines: Option<usize>,
}

/// A built-in demo upstream served by Weir itself.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DemoBackend {
    /// Name, for logs.
    pub name: S<String>,
    /// `IP:PORT` to serve on (loopback recommended).
    pub address: S<String>,
    /// Response body (a newline is appended).
    pub body: String,
    /// Status code. Default: `200`.
    pub status: Option<u16>,
}

/// A filter in a chain: a plugin name, or a plugin with a configuration for this place only.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum FilterRef {
    /// The plugin with its own configuration.
    Name(String),
    /// The plugin with another configuration (a per-route override).
    WithConfig {
        /// Plugin name.
        plugin: String,
        /// Configuration for this chain (any YAML value, given to the filter as JSON; a string is
        /// given as is).
        config: serde_json::Value,
    },
}

/// A proxy-wasm plugin: a module and its configuration (Envoy's `envoy.filters.http.wasm`,
/// Istio's `WasmPlugin`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Plugin {
    /// Unique name (the `plugin_name` property, the `plugin` label of metrics).
    pub name: S<String>,
    /// The module: a file path, `builtin:NAME` for a filter shipped in Weir, or an `https://`
    /// URL (requires `sha256`; downloaded once into the cache directory).
    pub module: S<String>,
    /// Hex SHA-256 of the module; checked for every source when given.
    pub sha256: Option<S<String>>,
    /// Root id, for modules with several root contexts. Default: empty.
    #[serde(default)]
    pub root_id: String,
    /// VM id: plugins with the same module, `vm_id` and `vm_config` share VMs, and so shared data
    /// and queues. Default: empty.
    #[serde(default)]
    pub vm_id: String,
    /// VM configuration (any YAML value, given as JSON; a string is given as is). Default: empty.
    pub vm_config: Option<serde_json::Value>,
    /// Plugin configuration (any YAML value, given as JSON; a string is given as is).
    /// Default: empty.
    pub config: Option<serde_json::Value>,
    /// What a request gets when the filter fails (trap, deadline, memory cap): `closed` (503,
    /// Istio FAIL_CLOSE), `open` (skip the filter, FAIL_OPEN) or `reload` (503 and recreate the
    /// VM at once, FAIL_RELOAD). Default: `closed`.
    pub fail: Option<S<String>>,
    /// Resource limits.
    #[serde(default)]
    pub limits: PluginLimits,
    /// Per-route or per-host configuration overrides (Higress `matchRules`): the first rule
    /// whose routes or hosts match the request replaces `config`. Default: none.
    #[serde(default)]
    pub match_rules: Vec<MatchRule>,
    /// The quota of the `weir_rate_limit` foreign function for this plugin's calls that carry
    /// no quota of their own. `builtin:ratelimit` passes its own `requests`/`per`/`burst` with
    /// every call, so this does not apply to it. Default: 100 requests per second, burst 100.
    pub rate_limit: Option<ForeignRateLimit>,
    /// Run the filter as Envoy and Istio would: Weir's foreign functions (`weir_get_properties`,
    /// `weir_rate_limit`) answer `NOT_FOUND`, so the filter's portable fallback runs (for
    /// checking, before shipping a filter to a mesh, that it behaves the same there).
    /// Default: `false`.
    #[serde(default)]
    pub portable: bool,
}

/// A plugin's resource limits.
#[derive(Debug, Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PluginLimits {
    /// Linear memory of one VM, in MiB. Default: `64`.
    pub memory_mib: Option<u32>,
    /// Deadline of one callback into the filter. Default: `100ms`.
    pub cpu_deadline: Option<Duration>,
    /// Body bytes a filter may hold while it pauses. Default: `1048576` (1 MiB).
    pub body_buffer_bytes: Option<usize>,
}

/// A per-route or per-host configuration of a plugin.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MatchRule {
    /// Route names this rule applies to.
    #[serde(default)]
    pub routes: Vec<S<String>>,
    /// Hosts (`api.example.com`, `*.example.com`) this rule applies to.
    #[serde(default)]
    pub hosts: Vec<S<String>>,
    /// The configuration for matching requests.
    pub config: serde_json::Value,
}

/// The quota behind the `weir_rate_limit` foreign function.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForeignRateLimit {
    /// Requests allowed per `per`, per key.
    pub requests: u32,
    /// The period. Default: `1s`.
    pub per: Option<Duration>,
    /// Burst size. Default: `requests`.
    pub burst: Option<u32>,
}
