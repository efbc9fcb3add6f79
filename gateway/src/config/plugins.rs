//! Checking and building the `plugins:` section and the filter chains of listeners and routes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use serde_saphyr::Location;
use weir_wasm_host::{Engine, FailPolicy, Limits, PluginConfig};

use super::duration::or;
use super::schema::{self, FilterRef};
use super::{ConfigError, ConfigErrors};
use crate::Shared;
use crate::filter::env::GatewayEnv;
use crate::filter::module;
use crate::filter::{Link, PluginEntry, config_bytes};
use crate::route::matcher::HostPattern;

/// A checked plugin, not started yet.
pub struct PendingPlugin {
    name: String,
    at: Location,
    config: PluginConfig,
    rules: Vec<(Vec<String>, Vec<HostPattern>, Bytes)>,
    rate_limit: (u32, Duration, u32),
    fingerprint: String,
}

/// A checked chain entry.
pub struct PendingLink {
    plugin: String,
    config: Option<Bytes>,
}

/// Check `plugins:`. `errors` collects problems as `(location, message)`.
pub fn check_plugins(
    plugins: &[schema::Plugin],
    json: &serde_json::Value,
    route_names: &HashSet<String>,
    sources: &module::Sources<'_>,
    errors: &mut Vec<(Location, String)>,
) -> Vec<PendingPlugin> {
    let mut out = Vec::new();
    let mut names = HashSet::new();
    for (i, p) in plugins.iter().enumerate() {
        let name = p.name.value.clone();
        let at = p.name.referenced;
        if !names.insert(name.clone()) {
            errors.push((
                at,
                format!("plugins[].name: duplicate plugin name `{name}`"),
            ));
        }
        let fail = match p.fail.as_ref().map(|f| (f.value.as_str(), f.referenced)) {
            None | Some(("closed", _)) => FailPolicy::Closed,
            Some(("open", _)) => FailPolicy::Open,
            Some(("reload", _)) => FailPolicy::Reload,
            Some((other, at)) => {
                errors.push((
                    at,
                    format!("plugins[{name}].fail: `{other}`: expected closed, open or reload"),
                ));
                FailPolicy::Closed
            }
        };
        let module = match module::load(
            &p.module.value,
            p.sha256.as_ref().map(|s| s.value.as_str()),
            sources,
        ) {
            Ok(m) => m,
            Err(e) => {
                errors.push((p.module.referenced, format!("plugins[{name}].module: {e}")));
                continue;
            }
        };
        if let Err(e) = weir_wasm_host::check_module(&module)
            .map_err(|e| e.to_string())
            .and_then(|r| {
                if r.runs_on_weir {
                    Ok(())
                } else {
                    Err(r.problems.join("; "))
                }
            })
        {
            errors.push((
                p.module.referenced,
                format!("plugins[{name}].module: Weir cannot run this module: {e}"),
            ));
            continue;
        }
        let d = Limits::default();
        let limits = Limits {
            memory_bytes: p
                .limits
                .memory_mib
                .map_or(d.memory_bytes, |m| m as usize * (1 << 20)),
            callback_deadline: or(p.limits.cpu_deadline, d.callback_deadline),
            body_buffer_bytes: p.limits.body_buffer_bytes.unwrap_or(d.body_buffer_bytes),
            ..d
        };
        if limits.memory_bytes == 0 || limits.callback_deadline.is_zero() {
            errors.push((
                at,
                format!("plugins[{name}].limits: limits must be positive"),
            ));
        }
        let mut config = PluginConfig::new(name.clone(), module.clone());
        config.root_id = p.root_id.clone();
        config.vm_id = p.vm_id.clone();
        config.vm_configuration = config_bytes(p.vm_config.as_ref());
        config.configuration = config_bytes(p.config.as_ref());
        config.fail = fail;
        config.limits = limits;
        config.portable = p.portable;
        let mut rules = Vec::new();
        for rule in &p.match_rules {
            let mut routes = Vec::new();
            for r in &rule.routes {
                if !route_names.contains(&r.value) {
                    errors.push((
                        r.referenced,
                        format!(
                            "plugins[{name}].match_rules[].routes: unknown route `{}`",
                            r.value
                        ),
                    ));
                }
                routes.push(r.value.clone());
            }
            let mut hosts = Vec::new();
            for h in &rule.hosts {
                match HostPattern::parse(&h.value) {
                    Ok(hp) => hosts.push(hp),
                    Err(e) => errors.push((
                        h.referenced,
                        format!("plugins[{name}].match_rules[].hosts: {e}"),
                    )),
                }
            }
            if routes.is_empty() && hosts.is_empty() {
                errors.push((
                    at,
                    format!("plugins[{name}].match_rules[]: a rule needs routes or hosts"),
                ));
            }
            rules.push((routes, hosts, config_bytes(Some(&rule.config))));
        }
        let rate_limit = match &p.rate_limit {
            None => (100, Duration::from_secs(1), 100),
            Some(r) => {
                if r.requests == 0 {
                    errors.push((
                        at,
                        format!("plugins[{name}].rate_limit.requests: must be positive"),
                    ));
                }
                (
                    r.requests,
                    or(r.per, Duration::from_secs(1)),
                    r.burst.unwrap_or(r.requests),
                )
            }
        };
        let fingerprint = format!(
            "{}|{}",
            module::sha256_hex(&module),
            json.get("plugins")
                .and_then(|v| v.get(i))
                .map(|v| v.to_string())
                .unwrap_or_default()
        );
        out.push(PendingPlugin {
            name,
            at,
            config,
            rules,
            rate_limit,
            fingerprint,
        });
    }
    out
}

/// Check a chain (`listeners[].filters` or `routes[].filters`).
pub fn check_chain(
    chain: &[FilterRef],
    plugins: &HashSet<String>,
    at: Location,
    field: &str,
    errors: &mut Vec<(Location, String)>,
) -> Vec<PendingLink> {
    chain
        .iter()
        .filter_map(|f| {
            let (plugin, config) = match f {
                FilterRef::Name(n) => (n.clone(), None),
                FilterRef::WithConfig { plugin, config } => {
                    (plugin.clone(), Some(config_bytes(Some(config))))
                }
            };
            if !plugins.contains(&plugin) {
                errors.push((at, format!("{field}: unknown plugin `{plugin}`")));
                return None;
            }
            Some(PendingLink { plugin, config })
        })
        .collect()
}

/// Start the plugins (reusing unchanged ones of the previous config with their VMs), with
/// their rule instances.
pub fn instantiate_plugins(
    pending: Vec<PendingPlugin>,
    previous: &BTreeMap<String, Arc<PluginEntry>>,
    engine: Option<&Engine>,
    shared: &Weak<Shared>,
    file: &str,
) -> Result<BTreeMap<String, Arc<PluginEntry>>, ConfigErrors> {
    let mut out = BTreeMap::new();
    let mut errors = Vec::new();
    for p in pending {
        if let Some(old) = previous
            .get(&p.name)
            .filter(|e| e.fingerprint == p.fingerprint)
        {
            out.insert(p.name.clone(), old.clone());
            continue;
        }
        let Some(engine) = engine else { continue };
        let err = |e: &dyn std::fmt::Display| ConfigError {
            file: file.to_string(),
            line: p.at.line() as usize,
            column: p.at.column() as usize,
            message: format!("plugins[{}]: {e}", p.name),
        };
        let (requests, per, burst) = p.rate_limit;
        let env = Arc::new(GatewayEnv::new(shared.clone(), requests, per, burst));
        let plugin = match weir_wasm_host::Plugin::new(engine, p.config, env) {
            Ok(plugin) => plugin,
            Err(e) => {
                errors.push(err(&e));
                continue;
            }
        };
        let mut by_route = HashMap::new();
        let mut by_host = Vec::new();
        for (routes, hosts, cfg) in p.rules {
            match plugin.with_configuration(cfg) {
                Ok(instance) => {
                    for r in routes {
                        by_route.entry(r).or_insert_with(|| instance.clone());
                    }
                    for h in hosts {
                        by_host.push((h, instance.clone()));
                    }
                }
                Err(e) => errors.push(err(&e)),
            }
        }
        out.insert(
            p.name,
            Arc::new(PluginEntry {
                plugin,
                by_route: Arc::new(by_route),
                by_host: Arc::new(by_host),
                overrides: Default::default(),
                fingerprint: p.fingerprint,
            }),
        );
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Build a chain's links.
pub fn links(
    chain: &[PendingLink],
    plugins: &BTreeMap<String, Arc<PluginEntry>>,
    file: &str,
) -> Result<Vec<Link>, ConfigErrors> {
    chain
        .iter()
        .map(|l| {
            let entry = plugins
                .get(&l.plugin)
                .ok_or_else(|| ConfigErrors(Vec::new()))?;
            entry.link(l.config.clone()).map_err(|e| {
                ConfigErrors(vec![ConfigError {
                    file: file.to_string(),
                    line: 0,
                    column: 0,
                    message: format!("filter `{}`: {e}", l.plugin),
                }])
            })
        })
        .collect()
}
