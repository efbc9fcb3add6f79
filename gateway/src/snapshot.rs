//! The snapshot: everything a request needs, compiled from one config and swapped atomically.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::route::table::RouteTable;
use crate::telemetry::access_log::AccessLog;
use crate::upstream::cluster::Cluster;

/// Downstream connection limits of a listener.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Max bytes of request headers.
    pub max_request_headers_bytes: usize,
    /// Max number of request headers.
    pub max_request_headers: usize,
    /// Header read timeout.
    pub request_header_timeout: Duration,
    /// Idle connection timeout.
    pub idle_timeout: Duration,
    /// Max connections.
    pub max_connections: usize,
    /// HTTP/2 max concurrent streams.
    pub max_concurrent_streams: u32,
    /// Accept `_` in header names.
    pub allow_underscores_in_headers: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_headers_bytes: 60 * 1024,
            max_request_headers: 100,
            request_header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_connections: 100_000,
            max_concurrent_streams: 100,
            allow_underscores_in_headers: false,
        }
    }
}

/// A compiled listener.
#[derive(Clone)]
pub struct ListenerSpec {
    /// Name.
    pub name: Arc<str>,
    /// Address to bind, as configured.
    pub address: SocketAddr,
    /// TLS server config, if TLS is terminated.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Expect a PROXY protocol header.
    pub proxy_protocol: bool,
    /// Limits.
    pub limits: Limits,
    /// TCP proxying, for a `protocol: tcp` listener (`None`: HTTP).
    pub tcp: Option<TcpProxySpec>,
}

/// Where a TCP listener's connections go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpProxySpec {
    /// The upstream cluster's name (looked up in the snapshot of each new connection).
    pub cluster: String,
}

impl std::fmt::Debug for ListenerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerSpec")
            .field("name", &self.name)
            .field("address", &self.address)
            .field("tls", &self.tls.is_some())
            .field("tcp", &self.tcp)
            .finish_non_exhaustive()
    }
}

/// A built-in demo upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoSpec {
    /// Name.
    pub name: String,
    /// Address.
    pub address: SocketAddr,
    /// Body.
    pub body: String,
    /// Status.
    pub status: u16,
}

/// Everything compiled from one config file.
pub struct Snapshot {
    /// Increases with every successful load.
    pub version: u64,
    /// Route table per listener name.
    pub tables: HashMap<Arc<str>, Arc<RouteTable>>,
    /// Listeners.
    pub listeners: Vec<ListenerSpec>,
    /// Clusters by name.
    pub clusters: BTreeMap<String, Arc<Cluster>>,
    /// Access log, if enabled.
    pub access_log: Option<Arc<AccessLog>>,
    /// Admin address, if enabled.
    pub admin: Option<SocketAddr>,
    /// Demo backends.
    pub demo_backends: Vec<DemoSpec>,
    /// Graceful drain timeout.
    pub drain_timeout: Duration,
    /// Watch the file for changes.
    pub watch: bool,
    /// The config as JSON, for `/config_dump`.
    pub config_json: serde_json::Value,
    /// Compiled plugins by name.
    pub plugins: BTreeMap<String, Arc<crate::filter::PluginEntry>>,
    /// Filter chain of each listener that has one.
    pub listener_filters: HashMap<Arc<str>, Vec<crate::filter::Link>>,
    /// Cache directory for wasm modules.
    pub cache_dir: std::path::PathBuf,
}

impl Snapshot {
    /// An empty snapshot (nothing is served).
    pub fn empty() -> Snapshot {
        Snapshot {
            version: 0,
            tables: HashMap::new(),
            listeners: Vec::new(),
            clusters: BTreeMap::new(),
            access_log: None,
            admin: None,
            demo_backends: Vec::new(),
            drain_timeout: Duration::from_secs(30),
            watch: false,
            config_json: serde_json::Value::Null,
            plugins: BTreeMap::new(),
            listener_filters: HashMap::new(),
            cache_dir: std::path::PathBuf::new(),
        }
    }

    /// The listener spec of `name`.
    pub fn listener(&self, name: &str) -> Option<&ListenerSpec> {
        self.listeners.iter().find(|l| &*l.name == name)
    }
}
