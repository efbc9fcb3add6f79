//! The decision for one request, independent of proxy-wasm: which rule applies, where the
//! tokens are, whether they verify, what the request becomes (headers removed and added) —
//! and the state behind it: the verified-token caches, the remote key sets and the requests
//! waiting for them.

use serde_json::{Map, Value};

use crate::cache::{TokenCache, Verified};
use crate::config::{
    Config, KeySource, Location, Mode, RemoteJwks, Requirement, normalize_audience,
};
use crate::jwks::Jwks;
use crate::jwt::{AuthError, Jwt, payload_section};

/// After a failed JWKS fetch, the next try comes this much later (Envoy's
/// `failed_refetch_duration` default).
pub const FAILED_REFETCH_MS: u64 = 1_000;

/// Envoy cuts the realm URL of `www-authenticate` at this many bytes.
const MAX_REALM_PATH: usize = 256;

/// The request headers as the host gives them (`:path`, `:authority`... included), names in
/// lower case.
pub struct RequestView<'a> {
    headers: &'a [(String, Vec<u8>)],
}

impl<'a> RequestView<'a> {
    /// A view of `headers`.
    pub fn new(headers: &'a [(String, Vec<u8>)]) -> RequestView<'a> {
        RequestView { headers }
    }

    /// Every value of header `name`.
    fn values(&self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The first value of header `name`, as text (lossy).
    fn text(&self, name: &'a str) -> String {
        self.values(name)
            .next()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    }

    fn has(&self, name: &'a str) -> bool {
        self.values(name).next().is_some()
    }
}

/// What to change in the request before it goes on: `remove` first, then `add`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Edits {
    /// Headers to remove (every value).
    pub remove: Vec<String>,
    /// Headers to add.
    pub add: Vec<(String, String)>,
    /// A new `:path` (a token taken out of the query).
    pub path: Option<String>,
}

/// A rejection: a local reply with Envoy's status, body and `www-authenticate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The reason.
    pub error: AuthError,
    /// The request URL, for `realm`.
    pub realm: String,
}

impl Denial {
    /// 401, or 403 for a disallowed audience.
    pub fn status(&self) -> u32 {
        self.error.status()
    }

    /// The reply body: Envoy's message.
    pub fn body(&self) -> &'static str {
        self.error.message()
    }

    /// `Bearer realm="URL"`, plus `, error="invalid_token"` unless the token is missing.
    pub fn www_authenticate(&self) -> String {
        let mut value = format!("Bearer realm=\"{}\"", self.realm);
        if self.error != AuthError::Missing {
            value.push_str(", error=\"invalid_token\"");
        }
        value
    }
}

/// Signature checks waiting for a remote key set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// (provider, token) pairs.
    checks: Vec<(usize, String)>,
    realm: String,
}

/// The outcome of [`Engine::check`].
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Let the request through after the edits.
    Allow(Edits),
    /// Reject it.
    Deny(Denial),
    /// Apply the edits (they assume the signatures will verify), pause the request and
    /// register it with [`Engine::wait`]; [`Engine::take_resolved`] says later whether it
    /// goes on or is rejected.
    Wait(Edits, Pending),
}

/// The keys of a remote provider, and when to fetch them.
struct RemoteState {
    jwks: Option<Jwks>,
    in_flight: bool,
    /// The last fetch failed (and no keys arrived since).
    failed: bool,
    /// Unix milliseconds of the next fetch.
    next_fetch_ms: u64,
}

/// Whether a provider's keys can be used now.
enum Keys<'a> {
    Ready(&'a Jwks),
    Pending,
    Failed,
}

/// The result of verifying one token with one provider.
enum Step {
    Verified(usize, Vec<(String, String)>),
    NeedKeys(usize, Vec<(String, String)>),
    Failed(AuthError),
}

/// A token found in the request.
struct Found {
    token: String,
    location: usize,
    /// Providers of the requirement that read this location, in requirement order.
    candidates: Vec<usize>,
}

/// Mutable state: caches, remote keys, waiting requests.
struct State {
    caches: Vec<TokenCache>,
    remote: Vec<Option<RemoteState>>,
    waiting: Vec<(u32, Pending)>,
    /// Signatures checked so far (cache hits check none); read by the tests.
    #[cfg(test)]
    signature_checks: u64,
}

/// The filter's logic and state for one plugin configuration (one root context).
pub struct Engine {
    config: Config,
    state: State,
}

impl Engine {
    /// An engine for `config`; remote key sets are due for fetching at once.
    pub fn new(config: Config) -> Engine {
        let caches = config
            .providers
            .iter()
            .map(|_| TokenCache::new(config.jwt_cache_size))
            .collect();
        let remote = config
            .providers
            .iter()
            .map(|p| match p.keys {
                KeySource::Inline(_) => None,
                KeySource::Remote(_) => Some(RemoteState {
                    jwks: None,
                    in_flight: false,
                    failed: false,
                    next_fetch_ms: 0,
                }),
            })
            .collect();
        Engine {
            config,
            state: State {
                caches,
                remote,
                waiting: Vec::new(),
                #[cfg(test)]
                signature_checks: 0,
            },
        }
    }

    /// True when some provider fetches its keys.
    pub fn has_remote_jwks(&self) -> bool {
        self.state.remote.iter().any(Option::is_some)
    }

    /// Decide about a request at `now` (Unix seconds).
    pub fn check(&mut self, req: &RequestView<'_>, now: u64) -> Decision {
        let Engine { config, state } = self;
        let mut edits = Edits::default();
        for header in &config.sanitize {
            if req.has(header) {
                edits.remove.push(header.clone());
            }
        }
        let path = req.text(":path");
        let url_path = path.split(['?', '#']).next().unwrap_or("");
        let Some(requirement) = config
            .rules
            .iter()
            .find(|r| r.matcher.matches(url_path))
            .and_then(|r| r.requires.as_ref())
        else {
            return Decision::Allow(edits);
        };
        let found = extract(config, requirement, req, &path);
        if found.is_empty() {
            return match requirement.mode {
                Mode::Required => Decision::Deny(Denial {
                    error: AuthError::Missing,
                    realm: realm(req, &path),
                }),
                Mode::AllowMissing | Mode::AllowMissingOrFailed => Decision::Allow(edits),
            };
        }
        let mut pending = Vec::new();
        let allow_failed = requirement.mode == Mode::AllowMissingOrFailed;
        for f in &found {
            let claim_headers = match verify_found(config, state, f, now) {
                Step::Verified(p, headers) => (p, headers),
                // In allow_missing_or_failed mode keys not there yet count as a failure: the
                // request cannot be held without committing to the token's headers.
                Step::NeedKeys(..) if allow_failed => continue,
                Step::NeedKeys(p, headers) => {
                    pending.push((p, f.token.clone()));
                    (p, headers)
                }
                Step::Failed(_) if allow_failed => continue,
                Step::Failed(error) => {
                    return Decision::Deny(Denial {
                        error,
                        realm: realm(req, &path),
                    });
                }
            };
            outputs(config, f, claim_headers, &path, &mut edits);
        }
        if pending.is_empty() {
            Decision::Allow(edits)
        } else {
            Decision::Wait(
                edits,
                Pending {
                    checks: pending,
                    realm: realm(req, &path),
                },
            )
        }
    }

    /// How many signatures were checked (a token found in the cache is not checked again).
    #[cfg(test)]
    pub fn signature_checks(&self) -> u64 {
        self.state.signature_checks
    }

    /// Hold the request of stream `context_id` until its keys arrive.
    pub fn wait(&mut self, context_id: u32, pending: Pending) {
        self.state.waiting.push((context_id, pending));
    }

    /// True when stream `context_id` waits for keys.
    pub fn is_waiting(&self, context_id: u32) -> bool {
        self.state.waiting.iter().any(|(id, _)| *id == context_id)
    }

    /// Forget stream `context_id` (it ended).
    pub fn cancel(&mut self, context_id: u32) {
        self.state.waiting.retain(|(id, _)| *id != context_id);
    }

    /// The waiting requests that can be decided now: `Ok` to resume, `Err` to reject.
    pub fn take_resolved(&mut self, now: u64) -> Vec<(u32, Result<(), Denial>)> {
        let Engine { config, state } = self;
        let mut resolved = Vec::new();
        let mut still = Vec::new();
        for (id, pending) in std::mem::take(&mut state.waiting) {
            match resolve(config, state, &pending, now) {
                Some(outcome) => resolved.push((id, outcome)),
                None => still.push((id, pending)),
            }
        }
        state.waiting = still;
        resolved
    }

    /// The remote providers whose keys should be fetched at `now_ms` (Unix milliseconds);
    /// they are marked as being fetched.
    pub fn due_fetches(&mut self, now_ms: u64) -> Vec<usize> {
        let mut due = Vec::new();
        for (p, remote) in self.state.remote.iter_mut().enumerate() {
            if let Some(r) = remote
                && !r.in_flight
                && now_ms >= r.next_fetch_ms
            {
                r.in_flight = true;
                due.push(p);
            }
        }
        due
    }

    /// Where provider `p` fetches its keys. Panics if `p` has inline keys.
    pub fn remote_jwks(&self, p: usize) -> &RemoteJwks {
        match &self.config.providers[p].keys {
            KeySource::Remote(r) => r,
            KeySource::Inline(_) => unreachable!("provider {p} has inline keys"),
        }
    }

    /// The name of provider `p`.
    pub fn provider_name(&self, p: usize) -> &str {
        &self.config.providers[p].name
    }

    /// A fetch of provider `p`'s keys ended at `now_ms` with a response body or an error.
    /// On success the keys replace the old ones (and the provider's verified tokens are
    /// forgotten); returns the skipped-key warnings. On failure the old keys, if any, stay;
    /// returns the reason.
    pub fn fetch_done(
        &mut self,
        p: usize,
        result: Result<&[u8], String>,
        now_ms: u64,
    ) -> Result<Vec<String>, String> {
        let cache_ms = duration_ms(self.remote_jwks(p).cache_duration);
        let Some(remote) = self.state.remote[p].as_mut() else {
            return Err(format!("provider {p} has no remote keys"));
        };
        remote.in_flight = false;
        let parsed = result.and_then(|body| Jwks::parse(body).map_err(|e| e.to_string()));
        match parsed {
            Ok((jwks, skipped)) => {
                remote.jwks = Some(jwks);
                remote.failed = false;
                remote.next_fetch_ms = now_ms.saturating_add(cache_ms);
                self.state.caches[p].clear();
                Ok(skipped)
            }
            Err(e) => {
                remote.failed = true;
                remote.next_fetch_ms = now_ms.saturating_add(FAILED_REFETCH_MS.min(cache_ms));
                Err(e)
            }
        }
    }
}

fn duration_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn keys<'a>(config: &'a Config, state: &'a State, p: usize) -> Keys<'a> {
    match (&config.providers[p].keys, &state.remote[p]) {
        (KeySource::Inline(jwks), _) => Keys::Ready(jwks),
        (KeySource::Remote(_), Some(RemoteState { jwks: Some(j), .. })) => Keys::Ready(j),
        (KeySource::Remote(_), Some(r)) if r.failed && !r.in_flight => Keys::Failed,
        (KeySource::Remote(_), _) => Keys::Pending,
    }
}

/// The tokens of the request at the locations of the requirement's providers.
fn extract(
    config: &Config,
    requirement: &Requirement,
    req: &RequestView<'_>,
    path: &str,
) -> Vec<Found> {
    let mut found = Vec::new();
    for (index, spec) in config.locations.iter().enumerate() {
        let candidates: Vec<usize> = requirement
            .providers
            .iter()
            .copied()
            .filter(|p| spec.providers.contains(p))
            .collect();
        if candidates.is_empty() {
            continue;
        }
        let mut push = |token: String| {
            found.push(Found {
                token,
                location: index,
                candidates: candidates.clone(),
            })
        };
        match &spec.location {
            Location::Header { name, prefix } => {
                for value in req.values(name) {
                    if let Some(token) = token_in_header(&String::from_utf8_lossy(value), prefix) {
                        push(token.to_string());
                    }
                }
            }
            Location::Param(name) => {
                if let Some((_, query)) = path.split_once('?') {
                    let query = query.split('#').next().unwrap_or("");
                    if let Some((_, v)) =
                        form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name)
                        && !v.is_empty()
                    {
                        push(v.into_owned());
                    }
                }
            }
            Location::Cookie(name) => {
                let cookie = req
                    .values("cookie")
                    .flat_map(|v| {
                        String::from_utf8_lossy(v)
                            .split(';')
                            .map(str::to_string)
                            .collect::<Vec<_>>()
                    })
                    .find_map(|pair| {
                        let (k, v) = pair.trim().split_once('=')?;
                        (k.trim() == name).then(|| v.trim().trim_matches('"').to_string())
                    });
                if let Some(v) = cookie.filter(|v| !v.is_empty()) {
                    push(v);
                }
            }
        }
    }
    found
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=')
}

/// The token in a header value: after `prefix` (found anywhere, ASCII case ignored, as
/// Envoy finds it), the run of base64url characters and dots; the whole trimmed value when
/// `prefix` is empty.
fn token_in_header<'v>(value: &'v str, prefix: &str) -> Option<&'v str> {
    if prefix.is_empty() {
        let v = value.trim();
        return (!v.is_empty()).then_some(v);
    }
    let start = value
        .as_bytes()
        .windows(prefix.len())
        .position(|w| w.eq_ignore_ascii_case(prefix.as_bytes()))?
        + prefix.len();
    let rest = value[start..].trim_start_matches(|c| !is_token_char(c));
    let end = rest.find(|c| !is_token_char(c)).unwrap_or(rest.len());
    (end > 0).then(|| &rest[..end])
}

/// Verify one found token: a cached verification of a candidate provider, else parse, pick
/// the provider by issuer and verify.
fn verify_found(config: &Config, state: &mut State, f: &Found, now: u64) -> Step {
    for &p in &f.candidates {
        let skew = config.providers[p].clock_skew_seconds;
        if let Some(v) = state.caches[p].get(&f.token, now, skew) {
            return Step::Verified(p, v.claim_headers.clone());
        }
    }
    let jwt = match Jwt::parse(&f.token) {
        Ok(j) => j,
        Err(e) => return Step::Failed(e),
    };
    let issuer_ok = |p: &usize| {
        config.providers[*p]
            .issuer
            .as_deref()
            .is_none_or(|i| jwt.iss.as_deref() == Some(i))
    };
    match f.candidates.iter().find(|p| issuer_ok(p)) {
        Some(&p) => verify_with(config, state, p, &jwt, &f.token, now),
        None => Step::Failed(AuthError::UnknownIssuer),
    }
}

/// Time, audience and signature checks of a parsed token for provider `p`; a success is
/// cached.
fn verify_with(
    config: &Config,
    state: &mut State,
    p: usize,
    jwt: &Jwt<'_>,
    token: &str,
    now: u64,
) -> Step {
    let provider = &config.providers[p];
    if let Err(e) = jwt.check_time(now, provider.clock_skew_seconds) {
        return Step::Failed(e);
    }
    if !provider.audiences.is_empty()
        && !jwt.aud.iter().any(|a| {
            provider
                .audiences
                .iter()
                .any(|allowed| allowed == normalize_audience(a))
        })
    {
        return Step::Failed(AuthError::AudienceNotAllowed);
    }
    let claim_headers: Vec<(String, String)> = provider
        .claim_to_headers
        .iter()
        .filter_map(|(header, path)| Some((header.clone(), claim_value(&jwt.payload, path)?)))
        .collect();
    let verdict = match keys(config, state, p) {
        Keys::Ready(jwks) => jwt.verify(jwks),
        Keys::Pending => return Step::NeedKeys(p, claim_headers),
        Keys::Failed => return Step::Failed(AuthError::JwksFetchFail),
    };
    #[cfg(test)]
    {
        state.signature_checks += 1;
    }
    if let Err(e) = verdict {
        return Step::Failed(e);
    }
    let verified = Verified {
        exp: jwt.exp,
        nbf: jwt.nbf,
        claim_headers,
    };
    state.caches[p].insert(token, verified.clone(), now, provider.clock_skew_seconds);
    Step::Verified(p, verified.claim_headers)
}

/// A waiting request's outcome, once every provider it needs has keys (or failed).
fn resolve(
    config: &Config,
    state: &mut State,
    pending: &Pending,
    now: u64,
) -> Option<Result<(), Denial>> {
    if pending
        .checks
        .iter()
        .any(|(p, _)| matches!(keys(config, state, *p), Keys::Pending))
    {
        return None;
    }
    for (p, token) in &pending.checks {
        let step = match Jwt::parse(token) {
            Ok(jwt) => verify_with(config, state, *p, &jwt, token, now),
            Err(e) => Step::Failed(e),
        };
        match step {
            Step::Verified(..) => {}
            Step::NeedKeys(..) => return None,
            Step::Failed(error) => {
                return Some(Err(Denial {
                    error,
                    realm: pending.realm.clone(),
                }));
            }
        }
    }
    Some(Ok(()))
}

/// What a verified token of provider `p` does to the request.
fn outputs(
    config: &Config,
    f: &Found,
    (p, claim_headers): (usize, Vec<(String, String)>),
    path: &str,
    edits: &mut Edits,
) {
    let provider = &config.providers[p];
    if !provider.forward {
        match &config.locations[f.location].location {
            Location::Header { name, .. } => {
                if !edits.remove.contains(name) {
                    edits.remove.push(name.clone());
                }
            }
            Location::Param(name) => {
                let current = edits.path.as_deref().unwrap_or(path);
                edits.path = Some(without_param(current, name));
            }
            // As in Envoy, a token is not taken out of a cookie.
            Location::Cookie(_) => {}
        }
    }
    if let Some(header) = &provider.forward_payload_header {
        edits
            .add
            .push((header.clone(), payload_section(&f.token).to_string()));
    }
    edits.add.extend(claim_headers);
}

/// `path` without the query parameter `name`.
fn without_param(path: &str, name: &str) -> String {
    let Some((base, query)) = path.split_once('?') else {
        return path.to_string();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            form_urlencoded::parse(pair.as_bytes())
                .next()
                .is_none_or(|(k, _)| k != name)
        })
        .collect();
    if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    }
}

/// A claim (a dotted path into the payload) as a header value: strings, numbers and
/// booleans only (Envoy's rule); `None` for other types or values unfit for a header.
fn claim_value(payload: &Map<String, Value>, path: &[String]) -> Option<String> {
    let (first, rest) = path.split_first()?;
    let mut value = payload.get(first)?;
    for segment in rest {
        value = value.as_object()?.get(segment)?;
    }
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => return None,
    };
    let fit = !text.is_empty() && text.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f));
    fit.then_some(text)
}

/// `scheme://host/path` of the request for `realm` (the path cut at 256 bytes), with
/// characters that cannot go in a quoted header value escaped.
fn realm(req: &RequestView<'_>, path: &str) -> String {
    let mut scheme = req.text("x-forwarded-proto");
    if scheme.is_empty() {
        scheme = req.text(":scheme");
    }
    if scheme.is_empty() {
        scheme = "http".into();
    }
    let mut cut = path.len().min(MAX_REALM_PATH);
    while !path.is_char_boundary(cut) {
        cut -= 1;
    }
    let url = format!("{scheme}://{}{}", req.text(":authority"), &path[..cut]);
    let mut out = String::with_capacity(url.len());
    for c in url.chars() {
        match c {
            '"' => out.push_str("%22"),
            '\\' => out.push_str("%5C"),
            c if c.is_ascii_graphic() => out.push(c),
            c => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
        }
    }
    out
}
