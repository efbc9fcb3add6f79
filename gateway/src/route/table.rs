//! The compiled route table: an immutable snapshot that a request reads once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, StatusCode};
use regex::Regex;

use super::matcher::{Conditions, HostPattern, RequestView};
use crate::ratelimit::RouteRateLimiter;
use crate::telemetry::metrics::RouteStats;
use crate::upstream::cluster::Cluster;
use crate::upstream::retry::RetryPolicy;

/// One compiled route.
#[derive(Debug)]
pub struct Route {
    /// Route name.
    pub name: Arc<str>,
    /// Conditions besides the host.
    pub conditions: Conditions,
    /// What to do with a matched request.
    pub action: Action,
    /// Request header edits.
    pub request_headers: HeaderEdits,
    /// Response header edits.
    pub response_headers: HeaderEdits,
    /// Path/host rewrite before proxying.
    pub rewrite: Rewrite,
    /// Overall timeout; `None` for none.
    pub timeout: Option<Duration>,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// Rate limiter, if configured.
    pub rate_limit: Option<Arc<RouteRateLimiter>>,
    /// Statistics, kept across reloads by route name.
    pub stats: Arc<RouteStats>,
    /// proxy-wasm filters of this route (after the listener's).
    pub filters: Vec<crate::filter::Link>,
}

/// What a route does.
#[derive(Debug)]
pub enum Action {
    /// Proxy to one of the weighted backends.
    Proxy(WeightedBackends),
    /// Answer with a redirect.
    Redirect(RedirectAction),
    /// Answer with a fixed response.
    Direct {
        /// Status.
        status: StatusCode,
        /// Body.
        body: bytes::Bytes,
        /// Content type, if any.
        content_type: Option<HeaderValue>,
    },
}

/// A backend: a cluster, optionally a subset of it.
#[derive(Debug)]
pub struct Backend {
    /// The cluster.
    pub cluster: Arc<Cluster>,
    /// Index of the subset in `cluster`, or `None` for all endpoints.
    pub subset: Option<usize>,
    /// Weight.
    pub weight: u32,
}

/// Weighted backends with their cumulative weights for picking.
#[derive(Debug)]
pub struct WeightedBackends {
    /// Backends, in config order.
    pub backends: Vec<Backend>,
    cumulative: Vec<u64>,
    total: u64,
}

impl WeightedBackends {
    /// Build from backends whose total weight is positive (checked by the compiler).
    pub fn new(backends: Vec<Backend>) -> WeightedBackends {
        let mut total = 0u64;
        let cumulative = backends
            .iter()
            .map(|b| {
                total += u64::from(b.weight);
                total
            })
            .collect();
        WeightedBackends {
            backends,
            cumulative,
            total,
        }
    }

    /// Pick a backend given a uniform random number.
    pub fn pick(&self, random: u64) -> &Backend {
        if self.backends.len() == 1 {
            return &self.backends[0];
        }
        let point = random % self.total;
        let i = self.cumulative.partition_point(|&c| c <= point);
        &self.backends[i.min(self.backends.len() - 1)]
    }
}

/// A compiled redirect.
#[derive(Debug)]
pub struct RedirectAction {
    /// New scheme.
    pub scheme: Option<String>,
    /// New host.
    pub host: Option<String>,
    /// New port.
    pub port: Option<u16>,
    /// New path.
    pub path: Option<String>,
    /// Status.
    pub code: StatusCode,
}

/// Compiled header edits.
#[derive(Debug, Default)]
pub struct HeaderEdits {
    /// Appended.
    pub add: Vec<(HeaderName, HeaderValue)>,
    /// Replaced.
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// Removed.
    pub remove: Vec<HeaderName>,
}

impl HeaderEdits {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.set.is_empty() && self.remove.is_empty()
    }

    /// Apply to a header map: remove, then set, then add.
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// Compiled rewrite.
#[derive(Debug, Default)]
pub struct Rewrite {
    /// Replace this matched prefix ...
    pub prefix: Option<(String, String)>,
    /// ... or apply this regex substitution to the path.
    pub regex: Option<(Regex, String)>,
    /// New host.
    pub host: Option<HeaderValue>,
}

impl Rewrite {
    /// Whether the path is rewritten.
    pub fn rewrites_path(&self) -> bool {
        self.prefix.is_some() || self.regex.is_some()
    }

    /// The new path for `path`.
    pub fn path<'a>(&self, path: &'a str) -> std::borrow::Cow<'a, str> {
        if let Some((from, to)) = &self.prefix
            && let Some(rest) = path.strip_prefix(from.as_str())
        {
            let mut out = String::with_capacity(to.len() + rest.len());
            out.push_str(to);
            if to.ends_with('/') && rest.starts_with('/') {
                out.push_str(&rest[1..]);
            } else {
                out.push_str(rest);
            }
            if out.is_empty() {
                out.push('/');
            }
            return out.into();
        }
        if let Some((re, sub)) = &self.regex {
            return re.replace_all(path, sub.as_str());
        }
        path.into()
    }
}

/// The routes of one listener, grouped by host pattern like Envoy's virtual hosts.
#[derive(Debug, Default)]
pub struct RouteTable {
    exact: HashMap<String, Vec<Arc<Route>>>,
    /// Suffix patterns, longest first.
    suffixes: Vec<(String, Vec<Arc<Route>>)>,
    any: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Build from routes in order with their host patterns.
    pub fn new(routes: &[(Vec<HostPattern>, Arc<Route>)]) -> RouteTable {
        let mut table = RouteTable::default();
        let mut suffixes: HashMap<String, Vec<Arc<Route>>> = HashMap::new();
        for (hosts, route) in routes {
            for host in hosts {
                match host {
                    HostPattern::Exact(h) => table
                        .exact
                        .entry(h.clone())
                        .or_default()
                        .push(route.clone()),
                    HostPattern::Suffix(s) => {
                        suffixes.entry(s.clone()).or_default().push(route.clone())
                    }
                    HostPattern::Any => table.any.push(route.clone()),
                }
            }
        }
        let mut suffixes: Vec<_> = suffixes.into_iter().collect();
        suffixes.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        table.suffixes = suffixes;
        table
    }

    /// The routes of the most specific host group that matches `host` (exact, then the longest
    /// wildcard suffix, then `*`), as Envoy picks a virtual host.
    pub fn candidates(&self, host: &str) -> &[Arc<Route>] {
        if let Some(routes) = self.exact.get(host) {
            return routes;
        }
        for (suffix, routes) in &self.suffixes {
            if host.len() > suffix.len() && host.ends_with(suffix.as_str()) {
                return routes;
            }
        }
        &self.any
    }

    /// The first route that matches, within the host's group.
    pub fn find(&self, host: &str, req: &RequestView<'_>) -> Option<&Arc<Route>> {
        self.candidates(host)
            .iter()
            .find(|r| r.conditions.matches(req))
    }

    /// Every route entry (a route listed under several hosts appears once per host).
    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.exact
            .values()
            .flatten()
            .chain(self.suffixes.iter().flat_map(|s| s.1.iter()))
            .chain(self.any.iter())
    }

    /// Number of route entries.
    pub fn len(&self) -> usize {
        self.exact.values().map(Vec::len).sum::<usize>()
            + self.suffixes.iter().map(|s| s.1.len()).sum::<usize>()
            + self.any.len()
    }

    /// Whether the table has no routes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
