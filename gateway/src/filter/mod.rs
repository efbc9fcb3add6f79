//! proxy-wasm filters on the request path: compiled plugins (`weir-wasm-host`), the chains of
//! listeners and routes, the gateway's side of the host (`env.rs`), module loading
//! (`module.rs`), driving a request and its response through a chain (`chain.rs`) and a TCP
//! connection through network filters (`network.rs`).

pub mod chain;
pub mod env;
pub mod module;
pub mod network;

use std::collections::HashMap;
use std::sync::Arc;

use weir_wasm_host::Plugin;

use crate::route::matcher::HostPattern;

/// One place in a chain: a plugin with its configuration alternatives.
#[derive(Clone)]
pub struct Link {
    /// The plugin instance used when no rule matches.
    pub default: Arc<Plugin>,
    /// Instances for named routes (from `match_rules[].routes`).
    pub by_route: Arc<HashMap<String, Arc<Plugin>>>,
    /// Instances for hosts (from `match_rules[].hosts`), first match wins.
    pub by_host: Arc<Vec<(HostPattern, Arc<Plugin>)>>,
}

impl Link {
    /// The plugin instance for a request on `route` with `host`.
    pub fn resolve(&self, route: &str, host: &str) -> &Arc<Plugin> {
        if let Some(p) = self.by_route.get(route) {
            return p;
        }
        for (pattern, p) in self.by_host.iter() {
            let hit = match pattern {
                HostPattern::Exact(h) => h == host,
                HostPattern::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
                HostPattern::Any => true,
            };
            if hit {
                return p;
            }
        }
        &self.default
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("plugin", &self.default.name())
            .finish_non_exhaustive()
    }
}

/// A compiled plugin and everything derived from it, kept across reloads when unchanged.
pub struct PluginEntry {
    /// The plugin with its own configuration.
    pub plugin: Arc<Plugin>,
    /// Rule instances by route name.
    pub by_route: Arc<HashMap<String, Arc<Plugin>>>,
    /// Rule instances by host.
    pub by_host: Arc<Vec<(HostPattern, Arc<Plugin>)>>,
    /// Instances with a chain-specific configuration, by configuration bytes.
    pub overrides: std::sync::Mutex<HashMap<bytes::Bytes, Arc<Plugin>>>,
    /// Fingerprint of the plugin's config and module.
    pub fingerprint: String,
}

impl PluginEntry {
    /// A link to this plugin, optionally with a configuration of its own.
    pub fn link(&self, config: Option<bytes::Bytes>) -> Result<Link, weir_wasm_host::PluginError> {
        let default = match config {
            None => self.plugin.clone(),
            Some(cfg) => {
                let mut overrides = self.overrides.lock().expect("overrides lock");
                match overrides.get(&cfg) {
                    Some(p) => p.clone(),
                    None => {
                        let p = self.plugin.with_configuration(cfg.clone())?;
                        overrides.insert(cfg, p.clone());
                        p
                    }
                }
            }
        };
        Ok(Link {
            default,
            by_route: self.by_route.clone(),
            by_host: self.by_host.clone(),
        })
    }
}

/// The bytes a filter receives for a YAML configuration value: a string as is, anything else
/// as JSON, nothing for null.
pub fn config_bytes(value: Option<&serde_json::Value>) -> bytes::Bytes {
    match value {
        None | Some(serde_json::Value::Null) => bytes::Bytes::new(),
        Some(serde_json::Value::String(s)) => bytes::Bytes::from(s.clone()),
        Some(other) => bytes::Bytes::from(other.to_string()),
    }
}
