//! `builtin:jwt-authn`: JSON Web Token authentication, as Envoy's `jwt_authn` filter (and
//! Istio's `RequestAuthentication`) does it. It runs unchanged in Envoy (proxy-wasm ABI
//! 0.2.1, Rust SDK).
//!
//! A request whose path matches a rule with a requirement must carry a token that verifies
//! with one of the required providers: signature (RS256/384/512, PS256/384/512, ES256,
//! ES384, HS256/384/512, EdDSA), `exp`/`nbf` (with clock skew), issuer and audience. Else
//! the filter answers itself, with Envoy's statuses and bodies:
//!
//! | case | status | body | `www-authenticate` |
//! |---|---|---|---|
//! | no token | 401 | `Jwt is missing` | `Bearer realm="URL"` |
//! | expired | 401 | `Jwt is expired` | `Bearer realm="URL", error="invalid_token"` |
//! | not yet valid | 401 | `Jwt not yet valid` | same |
//! | bad signature | 401 | `Jwt verification fails` | same |
//! | no key for the `kid`/`alg` | 401 | `Jwks doesn't have key to match kid or alg from Jwt` | same |
//! | issuer of no required provider | 401 | `Jwt issuer is not configured` | same |
//! | malformed | 401 | `Jwt is not in the form of Header.Payload.Signature`, ... | same |
//! | remote keys could not be fetched | 401 | `Jwks remote fetch is failed` | same |
//! | audience not allowed | **403** (as Envoy) | `Audiences in Jwt are not allowed` | same |
//!
//! `URL` is `scheme://host/path` of the request (path cut at 256 bytes). A verified token is
//! removed from the request (unless `forward`), and its payload and claims can be passed
//! upstream in headers. Every request first loses the payload and claim headers of all
//! providers, so a client cannot forge them. If a request has several tokens, all must verify.
//!
//! # Configuration
//!
//! The plugin's `config` (JSON; YAML in Weir's file). Unknown fields are errors; any error
//! makes `on_configure` fail with a log line saying what is wrong, and the gateway refuses
//! the configuration.
//!
//! ```yaml
//! config:
//!   providers:
//!     - name: example                        # required, unique
//!       issuer: https://issuer.example.com   # token `iss` must equal it; default: any issuer
//!       audiences: [api.example.com]         # token `aud` must contain one; default: not checked
//!       # The keys: exactly one of
//!       jwks: '{"keys":[...]}'               # inline JWKS, a JSON string or an object
//!       remote_jwks:                         # or fetched from a cluster
//!         cluster: idp                       # required: a configured cluster
//!         path: /.well-known/jwks.json       # required
//!         host: idp.example.com              # :authority; default: the cluster name
//!         cache_duration: 600s               # refetched after this; default 300s
//!         timeout: 5s                        # per fetch; default 5s
//!       # Where the token is; default (when none of the three is set): the
//!       # `authorization` header after "Bearer ", then the `access_token` query parameter.
//!       from_headers: [{ name: authorization, value_prefix: "Bearer " }]  # prefix default ""
//!       from_params: [access_token]
//!       from_cookies: [session]
//!       forward: false                       # keep the token upstream; default false (removed
//!                                            # from the header or the query; never from a cookie)
//!       forward_payload_header: x-jwt-payload   # base64url payload to upstream; default none
//!       claim_to_headers:                    # default none
//!         - { header_name: x-jwt-sub, claim_name: sub }       # dotted paths: `realm.role`
//!       clock_skew_seconds: 60               # for exp and nbf; default 60
//!   rules:                                   # first match wins; no match: not checked
//!     - match: { prefix: /public }           # no `requires`: not checked
//!     - match: { path: /login }              # `path` is exact, `prefix` a prefix (query excluded)
//!       requires: { provider_name: example }
//!     - match: { prefix: / }
//!       requires: { any: [example, other] }  # a token of any of these
//!     # requires: { provider_name: example, allow_missing: true }
//!     #   no token is fine, a token present must verify (Istio's RequestAuthentication)
//!     # requires: { allow_missing_or_failed: true }
//!     #   never rejects; a valid token still produces its headers
//!     # allow_missing / allow_missing_or_failed without providers: any provider
//!   jwt_cache_size: 100                      # verified tokens cached per provider; 0: none
//! ```
//!
//! Notes:
//! - A token is checked by the first required provider whose locations it was found at and
//!   whose `issuer` matches its `iss`.
//! - Claims go to headers if they are strings, numbers or booleans (Envoy's rule).
//! - Keys are chosen by `kid` when the token has one (a key without `kid` matches any), and
//!   by `alg` when the key has one. Keys of unsupported types (e.g. P-521, `use: enc`) are
//!   skipped with a warning; a supported key with broken material is an error.
//! - Verified-token cache: a token that verified is not verified again until its `exp`
//!   (tokens up to 4 KiB, least recently used out first, cleared when remote keys change).
//! - Remote keys are fetched by the root context on its first tick and then every
//!   `cache_duration` (1 s after a failure). A request arriving before the first keys waits
//!   for the fetch (its body too), then goes on or gets 401 `Jwks remote fetch is failed`.
//!   While a failed fetch waits for its retry, requests get that 401 at once. In
//!   `allow_missing_or_failed` mode nothing waits: a token without keys yet counts as failed.
//!   Each VM replica fetches its own copy.

mod authn;
mod cache;
mod config;
mod jwks;
mod jwt;

#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

use crate::authn::{Decision, Denial, Edits, Engine, RequestView};
use crate::config::Config;

/// First tick soon after start, to fetch remote keys; then once a second.
const FIRST_TICK: Duration = Duration::from_millis(1);
const TICK: Duration = Duration::from_secs(1);

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(JwtRoot {
            context_id,
            engine: None,
            calls: HashMap::new(),
            tick: Duration::ZERO,
        })
    });
}}

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, &format!("jwt-authn: {message}"));
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The root context: the configuration, the shared engine, the remote key fetches.
struct JwtRoot {
    context_id: u32,
    engine: Option<Rc<RefCell<Engine>>>,
    /// Callout token → provider whose keys it fetches.
    calls: HashMap<u32, usize>,
    tick: Duration,
}

impl JwtRoot {
    /// Resume or reject the requests whose keys are decided, then act as the root again.
    fn settle_waiting(&self, engine: &Rc<RefCell<Engine>>, now_ms: u64) {
        let resolved = engine.borrow_mut().take_resolved(now_ms / 1000);
        if resolved.is_empty() {
            return;
        }
        for (context_id, outcome) in resolved {
            // The engine only holds streams that are alive (they cancel in on_done).
            if hostcalls::set_effective_context(context_id).is_err() {
                continue;
            }
            let _ = match outcome {
                Ok(()) => hostcalls::resume_http_request(),
                Err(denial) => send_denial(&denial, hostcalls::send_http_response),
            };
        }
        let _ = hostcalls::set_effective_context(self.context_id);
    }

    fn set_tick(&mut self, period: Duration) {
        if self.tick != period {
            self.set_tick_period(period);
            self.tick = period;
        }
    }
}

fn send_denial(
    denial: &Denial,
    send: impl FnOnce(u32, Vec<(&str, &str)>, Option<&[u8]>) -> Result<(), proxy_wasm::types::Status>,
) -> Result<(), proxy_wasm::types::Status> {
    let challenge = denial.www_authenticate();
    send(
        denial.status(),
        vec![("www-authenticate", challenge.as_str())],
        Some(denial.body().as_bytes()),
    )
}

impl Context for JwtRoot {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let (Some(p), Some(engine)) = (self.calls.remove(&token_id), self.engine.clone()) else {
            return;
        };
        let now_ms = unix_ms(self.get_current_time());
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        let result = match self.get_http_call_response_header(":status").as_deref() {
            Some("200") => Ok(body.as_slice()),
            Some(status) => Err(format!("the JWKS server answered {status}")),
            None => Err("no response (connection failure or timeout)".to_string()),
        };
        let outcome = engine.borrow_mut().fetch_done(p, result, now_ms);
        let name = engine.borrow().provider_name(p).to_string();
        match outcome {
            Ok(skipped) => {
                for s in skipped {
                    log(
                        LogLevel::Warn,
                        &format!("provider `{name}`: remote JWKS {s} (skipped)"),
                    );
                }
            }
            Err(e) => log(
                LogLevel::Warn,
                &format!("provider `{name}`: remote JWKS fetch failed: {e}"),
            ),
        }
        self.settle_waiting(&engine, now_ms);
    }
}

impl RootContext for JwtRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match Config::parse(&bytes) {
            Ok((config, warnings)) => {
                for w in warnings {
                    log(LogLevel::Warn, &w);
                }
                let engine = Engine::new(config);
                if engine.has_remote_jwks() {
                    self.set_tick(FIRST_TICK);
                }
                self.engine = Some(Rc::new(RefCell::new(engine)));
                true
            }
            Err(e) => {
                log(LogLevel::Error, &format!("invalid configuration: {e}"));
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let Some(engine) = self.engine.clone() else {
            return;
        };
        self.set_tick(TICK);
        let now_ms = unix_ms(self.get_current_time());
        let due = engine.borrow_mut().due_fetches(now_ms);
        for p in due {
            let remote = engine.borrow().remote_jwks(p).clone();
            let call = self.dispatch_http_call(
                &remote.cluster,
                vec![
                    (":method", "GET"),
                    (":path", &remote.path),
                    (":authority", &remote.authority),
                    ("accept", "application/json"),
                ],
                None,
                vec![],
                remote.timeout,
            );
            match call {
                Ok(token) => {
                    self.calls.insert(token, p);
                }
                Err(status) => {
                    let reason = format!("cannot call cluster `{}`: {status:?}", remote.cluster);
                    let name = engine.borrow().provider_name(p).to_string();
                    log(
                        LogLevel::Warn,
                        &format!("provider `{name}`: remote JWKS fetch failed: {reason}"),
                    );
                    let _ = engine.borrow_mut().fetch_done(p, Err(reason), now_ms);
                }
            }
        }
        self.settle_waiting(&engine, now_ms);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(JwtFilter {
            context_id,
            engine: self.engine.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One request.
struct JwtFilter {
    context_id: u32,
    engine: Option<Rc<RefCell<Engine>>>,
}

impl JwtFilter {
    fn apply(&self, edits: &Edits) {
        for name in &edits.remove {
            self.set_http_request_header(name, None);
        }
        if let Some(path) = &edits.path {
            self.set_http_request_header(":path", Some(path));
        }
        for (name, value) in &edits.add {
            self.add_http_request_header(name, value);
        }
    }

    /// Hold body and trailers while the headers wait for keys, as Envoy's filter does.
    fn hold(&self) -> Action {
        match &self.engine {
            Some(e) if e.borrow().is_waiting(self.context_id) => Action::Pause,
            _ => Action::Continue,
        }
    }
}

impl Context for JwtFilter {
    fn on_done(&mut self) -> bool {
        if let Some(engine) = &self.engine {
            engine.borrow_mut().cancel(self.context_id);
        }
        true
    }
}

impl HttpContext for JwtFilter {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(engine) = self.engine.clone() else {
            // Not configured (on_configure failed): fail closed.
            self.send_http_response(500, vec![], Some(b"jwt-authn is not configured"));
            return Action::Pause;
        };
        let headers = self.get_http_request_headers_bytes();
        let now = unix_ms(self.get_current_time()) / 1000;
        let decision = engine.borrow_mut().check(&RequestView::new(&headers), now);
        match decision {
            Decision::Allow(edits) => {
                self.apply(&edits);
                Action::Continue
            }
            Decision::Deny(denial) => {
                let _ = send_denial(&denial, |status, headers, body| {
                    self.send_http_response(status, headers, body);
                    Ok(())
                });
                Action::Pause
            }
            Decision::Wait(edits, pending) => {
                self.apply(&edits);
                engine.borrow_mut().wait(self.context_id, pending);
                Action::Pause
            }
        }
    }

    fn on_http_request_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        self.hold()
    }

    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        self.hold()
    }
}
