//! The plugin configuration: the JSON schema (serde types, unknown fields rejected) and its
//! checked, compiled form. The fields are documented in the crate docs (`lib.rs`).

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::jwks::Jwks;

/// Envoy's default clock skew.
const DEFAULT_CLOCK_SKEW_SECONDS: u64 = 60;
/// Envoy's default size of the verified-token cache.
const DEFAULT_JWT_CACHE_SIZE: usize = 100;
/// How long a remote JWKS is used before it is fetched again (Envoy's default: 5 minutes).
const DEFAULT_CACHE_DURATION: Duration = Duration::from_secs(300);
/// Timeout of a remote JWKS fetch.
const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// A configuration that cannot be used, with the place and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

// ---- The file format ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    providers: Vec<RawProvider>,
    #[serde(default)]
    rules: Vec<RawRule>,
    #[serde(default)]
    jwt_cache_size: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    name: String,
    #[serde(default)]
    issuer: Option<String>,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    jwks: Option<Value>,
    #[serde(default)]
    remote_jwks: Option<RawRemoteJwks>,
    #[serde(default)]
    from_headers: Vec<RawHeaderLocation>,
    #[serde(default)]
    from_params: Vec<String>,
    #[serde(default)]
    from_cookies: Vec<String>,
    #[serde(default)]
    forward: bool,
    #[serde(default)]
    forward_payload_header: Option<String>,
    #[serde(default)]
    claim_to_headers: Vec<RawClaimToHeader>,
    #[serde(default)]
    clock_skew_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRemoteJwks {
    cluster: String,
    path: String,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    cache_duration: Option<RawDuration>,
    #[serde(default)]
    timeout: Option<RawDuration>,
}

/// `600s`, `5m`, `1h 30m`... or a number of seconds.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawDuration {
    Seconds(u64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeaderLocation {
    name: String,
    #[serde(default)]
    value_prefix: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClaimToHeader {
    header_name: String,
    claim_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(rename = "match")]
    matcher: RawMatch,
    #[serde(default)]
    requires: Option<RawRequires>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    path: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequires {
    #[serde(default)]
    provider_name: Option<String>,
    #[serde(default)]
    any: Option<Vec<String>>,
    #[serde(default)]
    allow_missing: bool,
    #[serde(default)]
    allow_missing_or_failed: bool,
}

// ---- The compiled form ----

/// A checked configuration.
pub struct Config {
    /// The providers, in configuration order.
    pub providers: Vec<Provider>,
    /// Where tokens are looked for: each distinct location once, with the providers using it.
    pub locations: Vec<LocationSpec>,
    /// The rules, first match wins.
    pub rules: Vec<Rule>,
    /// Size of each provider's verified-token cache (0: no cache).
    pub jwt_cache_size: usize,
    /// Headers removed from every request before anything else (the payload and claim
    /// headers of all providers), so that a client cannot forge them.
    pub sanitize: Vec<String>,
}

/// How one issuer's tokens are verified and what they produce.
pub struct Provider {
    /// The provider's name (unique).
    pub name: String,
    /// The required `iss`; `None` accepts any.
    pub issuer: Option<String>,
    /// Allowed audiences, normalized (see [`normalize_audience`]); empty: not checked.
    pub audiences: Vec<String>,
    /// Where the keys come from.
    pub keys: KeySource,
    /// Keep the token in the request (default: remove it).
    pub forward: bool,
    /// Header that receives the payload section of a verified token.
    pub forward_payload_header: Option<String>,
    /// (header, claim path) pairs: the claim's value goes to the header.
    pub claim_to_headers: Vec<(String, Vec<String>)>,
    /// Allowed clock difference in seconds for `exp` and `nbf`.
    pub clock_skew_seconds: u64,
}

/// The keys of a provider.
pub enum KeySource {
    /// A key set given in the configuration.
    Inline(Jwks),
    /// A key set fetched from a cluster.
    Remote(RemoteJwks),
}

/// Where to fetch a key set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteJwks {
    /// The cluster the request goes to.
    pub cluster: String,
    /// The request path.
    pub path: String,
    /// The `:authority` of the request.
    pub authority: String,
    /// How long a fetched set is used before it is fetched again.
    pub cache_duration: Duration,
    /// Timeout of one fetch.
    pub timeout: Duration,
}

/// Where a token may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A request header (lower case); the token follows `prefix` in the value (empty: the
    /// whole value). The prefix is matched without regard to ASCII case.
    Header {
        /// Header name, lower case.
        name: String,
        /// Text before the token.
        prefix: String,
    },
    /// A query parameter.
    Param(String),
    /// A cookie.
    Cookie(String),
}

/// A location and the providers (indices) that read it.
pub struct LocationSpec {
    /// The location.
    pub location: Location,
    /// Providers reading it, in configuration order.
    pub providers: Vec<usize>,
}

/// A rule: requests whose path matches get `requires` (none: not checked).
pub struct Rule {
    /// The path match.
    pub matcher: PathMatch,
    /// The requirement; `None` lets the request through unchecked.
    pub requires: Option<Requirement>,
}

/// A match on the request path (without the query).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// The path starts with this.
    Prefix(String),
    /// The path is exactly this.
    Exact(String),
}

impl PathMatch {
    /// True when `path` (query excluded) matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Exact(p) => path == p,
        }
    }
}

/// What a matched request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// Providers that may verify the token (indices).
    pub providers: Vec<usize>,
    /// What a missing or failing token means.
    pub mode: Mode,
}

/// How strict a requirement is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A valid token is required.
    Required,
    /// No token is fine; a token present must be valid (Istio's `RequestAuthentication`).
    AllowMissing,
    /// Never rejects; a valid token still produces its headers.
    AllowMissingOrFailed,
}

/// Envoy compares audiences without a leading `http://`/`https://` and a trailing `/`.
pub fn normalize_audience(aud: &str) -> &str {
    let aud = aud
        .strip_prefix("https://")
        .or_else(|| aud.strip_prefix("http://"))
        .unwrap_or(aud);
    aud.strip_suffix('/').unwrap_or(aud)
}

impl Config {
    /// Read and check a configuration (JSON). Returns it and warnings for the log (keys of
    /// inline key sets that were skipped).
    pub fn parse(bytes: &[u8]) -> Result<(Config, Vec<String>), ConfigError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return err("the configuration is empty: `providers` is required");
        }
        let raw: RawConfig = serde_json::from_slice(bytes)
            .map_err(|e| ConfigError(format!("invalid configuration: {e}")))?;
        compile(raw)
    }
}

fn compile(raw: RawConfig) -> Result<(Config, Vec<String>), ConfigError> {
    if raw.providers.is_empty() {
        return err("`providers` is empty: at least one provider is needed");
    }
    let mut warnings = Vec::new();
    let mut by_name: HashMap<String, usize> = HashMap::new();
    let mut providers = Vec::new();
    let mut locations: Vec<LocationSpec> = Vec::new();
    let mut sanitize: Vec<String> = Vec::new();
    for (index, p) in raw.providers.into_iter().enumerate() {
        let at = format!("providers[{index}]");
        if p.name.is_empty() {
            return err(format!("{at}: `name` is empty"));
        }
        let at = format!("provider `{}`", p.name);
        if by_name.insert(p.name.clone(), index).is_some() {
            return err(format!("{at}: the name is used twice"));
        }
        let (provider, provider_locations, provider_warnings) = compile_provider(p, &at)?;
        warnings.extend(provider_warnings);
        for location in provider_locations {
            match locations.iter_mut().find(|l| l.location == location) {
                Some(spec) => spec.providers.push(index),
                None => locations.push(LocationSpec {
                    location,
                    providers: vec![index],
                }),
            }
        }
        let outputs = provider
            .forward_payload_header
            .iter()
            .chain(provider.claim_to_headers.iter().map(|(h, _)| h));
        for header in outputs {
            if !sanitize.contains(header) {
                sanitize.push(header.clone());
            }
        }
        providers.push(provider);
    }
    let mut rules = Vec::new();
    for (index, rule) in raw.rules.into_iter().enumerate() {
        let at = format!("rules[{index}]");
        let matcher = match (rule.matcher.prefix, rule.matcher.path) {
            (Some(p), None) if p.starts_with('/') => PathMatch::Prefix(p),
            (None, Some(p)) if p.starts_with('/') => PathMatch::Exact(p),
            (Some(_), None) | (None, Some(_)) => {
                return err(format!("{at}: a match path must start with `/`"));
            }
            _ => {
                return err(format!(
                    "{at}: `match` needs exactly one of `prefix` and `path`"
                ));
            }
        };
        let requires = match rule.requires {
            None => None,
            Some(r) => Some(compile_requires(r, &by_name, &at)?),
        };
        rules.push(Rule { matcher, requires });
    }
    Ok((
        Config {
            providers,
            locations,
            rules,
            jwt_cache_size: raw.jwt_cache_size.unwrap_or(DEFAULT_JWT_CACHE_SIZE),
            sanitize,
        },
        warnings,
    ))
}

fn compile_provider(
    p: RawProvider,
    at: &str,
) -> Result<(Provider, Vec<Location>, Vec<String>), ConfigError> {
    let mut warnings = Vec::new();
    let keys = match (p.jwks, p.remote_jwks) {
        (Some(jwks), None) => {
            let parsed = match &jwks {
                Value::String(text) => Jwks::parse(text.as_bytes()),
                Value::Object(_) => Jwks::from_value(&jwks),
                _ => return err(format!("{at}: `jwks` must be a JSON object or a string")),
            };
            let (set, skipped) = parsed.map_err(|e| ConfigError(format!("{at}: {e}")))?;
            warnings.extend(
                skipped
                    .into_iter()
                    .map(|s| format!("{at}: JWKS {s} (skipped)")),
            );
            KeySource::Inline(set)
        }
        (None, Some(r)) => KeySource::Remote(compile_remote(r, at)?),
        (Some(_), Some(_)) => {
            return err(format!("{at}: `jwks` and `remote_jwks` exclude each other"));
        }
        (None, None) => return err(format!("{at}: one of `jwks` and `remote_jwks` is required")),
    };
    if p.issuer.as_deref() == Some("") {
        return err(format!(
            "{at}: `issuer` is empty (leave it out to accept any issuer)"
        ));
    }
    let mut locations = Vec::new();
    for h in p.from_headers {
        let name = header_name(&h.name, at, "from_headers")?;
        let location = Location::Header {
            name,
            prefix: h.value_prefix.unwrap_or_default(),
        };
        if !locations.contains(&location) {
            locations.push(location);
        }
    }
    for param in p.from_params {
        if param.is_empty() {
            return err(format!("{at}: a `from_params` name is empty"));
        }
        locations.push(Location::Param(param));
    }
    for cookie in p.from_cookies {
        if cookie.is_empty() {
            return err(format!("{at}: a `from_cookies` name is empty"));
        }
        locations.push(Location::Cookie(cookie));
    }
    if locations.is_empty() {
        locations.push(Location::Header {
            name: "authorization".into(),
            prefix: "Bearer ".into(),
        });
        locations.push(Location::Param("access_token".into()));
    }
    let forward_payload_header = match p.forward_payload_header {
        Some(h) => Some(header_name(&h, at, "forward_payload_header")?),
        None => None,
    };
    let mut claim_to_headers = Vec::new();
    for c in p.claim_to_headers {
        let header = header_name(&c.header_name, at, "claim_to_headers")?;
        if c.claim_name.is_empty() || c.claim_name.split('.').any(str::is_empty) {
            return err(format!(
                "{at}: claim name {:?} is not a claim or a dotted path",
                c.claim_name
            ));
        }
        claim_to_headers.push((
            header,
            c.claim_name.split('.').map(str::to_string).collect(),
        ));
    }
    Ok((
        Provider {
            name: p.name,
            issuer: p.issuer,
            audiences: p
                .audiences
                .iter()
                .map(|a| normalize_audience(a).to_string())
                .collect(),
            keys,
            forward: p.forward,
            forward_payload_header,
            claim_to_headers,
            clock_skew_seconds: p.clock_skew_seconds.unwrap_or(DEFAULT_CLOCK_SKEW_SECONDS),
        },
        locations,
        warnings,
    ))
}

fn compile_remote(r: RawRemoteJwks, at: &str) -> Result<RemoteJwks, ConfigError> {
    if r.cluster.is_empty() {
        return err(format!("{at}: `remote_jwks.cluster` is empty"));
    }
    if !r.path.starts_with('/') {
        return err(format!("{at}: `remote_jwks.path` must start with `/`"));
    }
    let duration = |d: Option<RawDuration>, field: &str, default: Duration| match d {
        None => Ok(default),
        Some(RawDuration::Seconds(s)) => Ok(Duration::from_secs(s)),
        Some(RawDuration::Text(t)) => humantime::parse_duration(&t)
            .map_err(|e| ConfigError(format!("{at}: `remote_jwks.{field}` {t:?}: {e}"))),
    };
    let cache_duration = duration(r.cache_duration, "cache_duration", DEFAULT_CACHE_DURATION)?;
    let timeout = duration(r.timeout, "timeout", DEFAULT_FETCH_TIMEOUT)?;
    if cache_duration.is_zero() || timeout.is_zero() {
        return err(format!(
            "{at}: `remote_jwks` durations must be more than zero"
        ));
    }
    Ok(RemoteJwks {
        authority: r.host.unwrap_or_else(|| r.cluster.clone()),
        cluster: r.cluster,
        path: r.path,
        cache_duration,
        timeout,
    })
}

fn compile_requires(
    r: RawRequires,
    by_name: &HashMap<String, usize>,
    at: &str,
) -> Result<Requirement, ConfigError> {
    let mode = match (r.allow_missing, r.allow_missing_or_failed) {
        (false, false) => Mode::Required,
        (true, false) => Mode::AllowMissing,
        (false, true) => Mode::AllowMissingOrFailed,
        (true, true) => {
            return err(format!(
                "{at}: `allow_missing` and `allow_missing_or_failed` exclude each other"
            ));
        }
    };
    let names: Vec<String> = match (r.provider_name, r.any) {
        (Some(name), None) => vec![name],
        (None, Some(list)) if !list.is_empty() => list,
        (None, Some(_)) => return err(format!("{at}: `requires.any` is empty")),
        (Some(_), Some(_)) => {
            return err(format!(
                "{at}: `provider_name` and `any` exclude each other"
            ));
        }
        // Only allow_missing / allow_missing_or_failed: any provider (Envoy's behaviour).
        (None, None) if mode != Mode::Required => {
            let mut all: Vec<(&String, &usize)> = by_name.iter().collect();
            all.sort_by_key(|(_, i)| **i);
            all.into_iter().map(|(n, _)| n.clone()).collect()
        }
        (None, None) => {
            return err(format!(
                "{at}: `requires` needs `provider_name`, `any`, `allow_missing` or `allow_missing_or_failed`"
            ));
        }
    };
    let mut providers = Vec::new();
    for name in names {
        match by_name.get(&name) {
            Some(i) if !providers.contains(i) => providers.push(*i),
            Some(_) => {}
            None => return err(format!("{at}: unknown provider `{name}`")),
        }
    }
    Ok(Requirement { providers, mode })
}

/// A header name, lower-cased; HTTP token characters only.
fn header_name(name: &str, at: &str, field: &str) -> Result<String, ConfigError> {
    let valid = !name.is_empty()
        && !name.starts_with(':')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !valid {
        return err(format!(
            "{at}: `{field}`: {name:?} is not a valid header name"
        ));
    }
    Ok(name.to_ascii_lowercase())
}
