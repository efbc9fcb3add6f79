//! Test guest covering the HTTP host functions: headers (pseudo-headers, non-UTF-8 values),
//! bodies (pause, buffer, replace), trailers, local replies, properties and `set_property`,
//! shared data with CAS, metrics, foreign functions, log level, VM and plugin configuration.
//!
//! Plugin configuration: a comma-separated list of words: `buffer` (pause request body chunks
//! until the end, then replace it), `buffer-resp` (same for the response), `hold-resp` (pause
//! on the response headers, so the body comes buffered), `reject` (refuse configuration).

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType, Status};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { config: String::new(), vm_config: String::new(), metrics: None })
    });
}}

#[derive(Clone, Copy)]
struct Metrics {
    requests: u32,
    logged: u32,
    done: u32,
    gauge: u32,
    hist: u32,
}

struct Root {
    config: String,
    vm_config: String,
    metrics: Option<Metrics>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        self.vm_config = self
            .get_vm_configuration()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        self.config = self
            .get_plugin_configuration()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if self.config.split(',').any(|w| w == "reject") {
            return false;
        }
        // Outside on_vm_start the VM configuration is not readable.
        if self.get_vm_configuration().is_some() {
            return false;
        }
        let define = |t, n| hostcalls::define_metric(t, n).unwrap();
        self.metrics = Some(Metrics {
            requests: define(MetricType::Counter, "guest_http.requests"),
            logged: define(MetricType::Counter, "guest_http.logged"),
            done: define(MetricType::Counter, "guest_http.done"),
            gauge: define(MetricType::Gauge, "guest_http.gauge"),
            hist: define(MetricType::Histogram, "guest_http.body_size"),
        });
        hostcalls::log(LogLevel::Info, &format!("configured: {}", self.config)).unwrap();
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            config: self.config.clone(),
            vm_config: self.vm_config.clone(),
            metrics: self.metrics.unwrap(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    config: String,
    vm_config: String,
    metrics: Metrics,
}

impl Http {
    fn has(&self, word: &str) -> bool {
        self.config.split(',').any(|w| w == word)
    }

    fn hits(&self) -> u64 {
        // Increment a shared counter with a CAS loop.
        loop {
            let (value, cas) = self.get_shared_data("guest_http.hits");
            let n = value
                .map(|v| u64::from_le_bytes(v.try_into().unwrap()))
                .unwrap_or(0)
                + 1;
            match self.set_shared_data("guest_http.hits", Some(&n.to_le_bytes()), cas) {
                Ok(()) => return n,
                Err(Status::CasMismatch) => continue,
                Err(e) => panic!("set_shared_data: {e:?}"),
            }
        }
    }
}

impl Context for Http {
    fn on_done(&mut self) -> bool {
        hostcalls::increment_metric(self.metrics.done, 1).unwrap();
        true
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, n: usize, eos: bool) -> Action {
        hostcalls::increment_metric(self.metrics.requests, 1).unwrap();
        hostcalls::increment_metric(self.metrics.gauge, -1).unwrap();
        let path = self.get_http_request_header(":path").unwrap_or_default();
        if path == "/deny" {
            self.send_http_response(403, vec![("x-deny", "yes")], Some(b"denied"));
            return Action::Pause;
        }
        if path == "/grpc-deny" {
            self.send_grpc_response(
                proxy_wasm::types::GrpcStatusCode::PermissionDenied,
                Some("nope"),
                vec![],
            );
            return Action::Pause;
        }
        if path == "/close" {
            hostcalls::reset_http_request().unwrap();
            return Action::Pause;
        }
        if path == "/pause" {
            // Paused without callouts: the gateway holds the headers until the body.
            return Action::Pause;
        }
        if path.starts_with("/rewrite") {
            self.set_http_request_header(":path", Some("/rewritten"));
        }
        let pairs = self.get_http_request_headers_bytes();
        self.set_http_request_header("x-count", Some(&pairs.len().to_string()));
        self.set_http_request_header("x-n", Some(&n.to_string()));
        self.set_http_request_header("x-eos", Some(&eos.to_string()));
        for name in [":method", ":authority", ":scheme"] {
            let v = self.get_http_request_header(name).unwrap_or_default();
            self.set_http_request_header(&format!("x-seen-{}", &name[1..]), Some(&v));
        }
        if let Some(v) = self.get_http_request_header_bytes("x-binary") {
            self.set_http_request_header("x-binary-len", Some(&v.len().to_string()));
            self.set_http_request_header_bytes("x-binary-copy", Some(&v));
        }
        self.add_http_request_header("x-added", "1");
        self.add_http_request_header("x-added", "2");
        self.set_http_request_header("x-remove-me", None);
        self.set_http_request_header("x-vm-config", Some(&self.vm_config.clone()));
        self.set_http_request_header("x-config", Some(&self.config.clone()));
        let level = hostcalls::get_log_level().unwrap();
        self.set_http_request_header("x-log-level", Some(&(level as u32).to_string()));
        hostcalls::log(LogLevel::Warn, &format!("request to {path}")).unwrap();
        self.set_http_request_header("x-hits", Some(&self.hits().to_string()));
        if let Some(arg) = self.get_http_request_header("x-foreign") {
            match hostcalls::call_foreign_function("weir_test_echo", Some(arg.as_bytes())) {
                Ok(v) => {
                    let v = String::from_utf8(v.unwrap_or_default()).unwrap();
                    self.set_http_request_header("x-foreign-result", Some(&v));
                }
                Err(s) => {
                    self.set_http_request_header("x-foreign-result", Some(&format!("{s:?}")));
                }
            }
            match hostcalls::call_foreign_function("missing_function", None) {
                Err(Status::NotFound) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        if self.get_http_request_header("x-get-properties").is_some() {
            // Weir's batch property lookup: `:path`, a property that does not exist, the plugin
            // name; then arguments that promise more paths than they carry.
            let paths: [&[u8]; 3] = [b"request\0path", b"no\0such", b"plugin_name"];
            let mut args = 3u32.to_le_bytes().to_vec();
            for p in paths {
                args.extend_from_slice(&(p.len() as u32).to_le_bytes());
            }
            for p in paths {
                args.extend_from_slice(p);
            }
            match hostcalls::call_foreign_function("weir_get_properties", Some(&args)) {
                Ok(r) => {
                    let r = r.unwrap_or_default();
                    let mut at = 16;
                    let values: Vec<String> = (0..3)
                        .map(|i| {
                            let len =
                                u32::from_le_bytes(r[4 + 4 * i..8 + 4 * i].try_into().unwrap());
                            if len == u32::MAX {
                                return "<none>".to_string();
                            }
                            let v = String::from_utf8_lossy(&r[at..at + len as usize]).into_owned();
                            at += len as usize;
                            v
                        })
                        .collect();
                    self.set_http_request_header("x-properties", Some(&values.join("|")));
                    let bad = hostcalls::call_foreign_function(
                        "weir_get_properties",
                        Some(&9u32.to_le_bytes()),
                    );
                    self.set_http_request_header(
                        "x-properties-bad",
                        Some(&format!("{:?}", bad.err())),
                    );
                }
                // A host without the function (Envoy, or a portable plugin).
                Err(status) => {
                    self.set_http_request_header("x-properties", Some(&format!("{status:?}")));
                }
            }
        }
        if let Some(key) = self.get_http_request_header("x-ratelimit-key") {
            let mut args = 1u32.to_le_bytes().to_vec();
            args.extend_from_slice(key.as_bytes());
            let result = hostcalls::call_foreign_function("weir_rate_limit", Some(&args))
                .unwrap()
                .unwrap_or_default();
            if result.first() == Some(&0) {
                let ns = u64::from_le_bytes(result[1..9].try_into().unwrap());
                let secs = ns.div_ceil(1_000_000_000).to_string();
                self.send_http_response(429, vec![("retry-after", &secs)], None);
                return Action::Pause;
            }
        }
        if self.has("buffer") && !self.has("keep-length") {
            // The body's length will change: as filters written for Envoy do, drop the
            // content-length ("keep-length": a filter that forgets to).
            self.set_http_request_header("content-length", None);
        }
        self.set_property(vec!["weir", "color"], Some(b"blue"));
        let time = self.get_current_time();
        assert!(time.elapsed().unwrap_or_default() < Duration::from_secs(3600));
        // Configuration is not readable here.
        assert!(
            hostcalls::get_buffer(proxy_wasm::types::BufferType::PluginConfiguration, 0, 100)
                .unwrap()
                .is_none()
        );
        Action::Continue
    }

    fn on_http_request_body(&mut self, size: usize, eos: bool) -> Action {
        hostcalls::record_metric(self.metrics.hist, size as u64).unwrap();
        if self.has("empty-body") {
            if !eos {
                return Action::Pause;
            }
            self.set_http_request_body(0, size, b"");
            return Action::Continue;
        }
        if !self.has("buffer") {
            return Action::Continue;
        }
        if !eos {
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, size).unwrap_or_default();
        let mut new = body.to_ascii_uppercase();
        new.extend_from_slice(format!("!{size}").as_bytes());
        self.set_http_request_body(0, size, &new);
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, n: usize) -> Action {
        if self.has("buffer") {
            // The body held so far is readable and replaceable here.
            if let Some(body) = self.get_http_request_body(0, 1 << 20) {
                self.set_http_request_body(0, body.len(), &body.to_ascii_uppercase());
            }
        }
        self.add_http_request_trailer("x-trailer-seen", &n.to_string());
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.set_http_response_header("x-resp", Some("1"));
        let prop = |s: &Self, p: Vec<&str>| {
            s.get_property(p)
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_else(|| "none".into())
        };
        let values = [
            ("x-prop-path", prop(self, vec!["request", "path"])),
            ("x-prop-url-path", prop(self, vec!["request", "url_path"])),
            ("x-prop-method", prop(self, vec!["request", "method"])),
            ("x-prop-host", prop(self, vec!["request", "host"])),
            ("x-prop-plugin", prop(self, vec!["plugin_name"])),
            ("x-prop-vm", prop(self, vec!["plugin_vm_id"])),
            ("x-prop-source", prop(self, vec!["source", "address"])),
            ("x-prop-route", prop(self, vec!["xds", "route_name"])),
            ("x-prop-color", prop(self, vec!["weir", "color"])),
            ("x-prop-missing", prop(self, vec!["no", "such"])),
            ("x-prop-referer", prop(self, vec!["request", "referer"])),
            ("x-prop-useragent", prop(self, vec!["request", "useragent"])),
            ("x-prop-id", prop(self, vec!["request", "id"])),
        ];
        for (k, v) in values {
            self.set_http_response_header(k, Some(&v));
        }
        let int = |s: &Self, p: Vec<&str>| {
            s.get_property(p)
                .map(|v| u64::from_le_bytes(v.try_into().unwrap()).to_string())
                .unwrap_or_else(|| "none".into())
        };
        let code = int(self, vec!["response", "code"]);
        self.set_http_response_header("x-prop-code", Some(&code));
        let port = int(self, vec!["source", "port"]);
        self.set_http_response_header("x-prop-port", Some(&port));
        let conn = int(self, vec!["connection_id"]);
        self.set_http_response_header("x-prop-conn", Some(&conn));
        let req_path = self.get_http_request_header(":path").unwrap_or_default();
        self.set_http_response_header("x-req-path", Some(&req_path));
        if let Some(headers) = self.get_property(vec!["request", "headers"]) {
            self.set_http_response_header("x-prop-headers-len", Some(&headers.len().to_string()));
        }
        if self.get_http_request_header("x-set-status").is_some() {
            self.set_http_response_header(":status", Some("201"));
        }
        self.set_http_response_header("server", None);
        if self.has("buffer-resp") && !self.has("keep-length") {
            self.set_http_response_header("content-length", None);
        }
        if self.has("hold-resp") {
            // Envoy buffers the body while a filter holds the headers; it gets it whole.
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, eos: bool) -> Action {
        if !self.has("buffer-resp") {
            return Action::Continue;
        }
        if !eos {
            return Action::Pause;
        }
        let mut body = self.get_http_response_body(0, size).unwrap_or_default();
        body.extend_from_slice(b"-tail");
        self.set_http_response_body(0, size, &body);
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _n: usize) -> Action {
        self.set_http_response_trailer("x-resp-trailer", Some("1"));
        Action::Continue
    }

    fn on_log(&mut self) {
        hostcalls::increment_metric(self.metrics.logged, 1).unwrap();
    }
}
