//! Misbehaving guest for containment tests. Configuration: `trap-configure` panics in
//! `on_configure`, `reject` makes it return false, `tick-trap-once` ticks every 5 ms and panics
//! in the first tick of the vm_id (remembered in shared data). Request headers: `x-trap` panics,
//! `x-loop` loops forever, `x-grow` allocates without bound; `x-trap-response` panics in
//! `on_http_response_headers`.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        match self.get_plugin_configuration().as_deref() {
            Some(b"trap-configure") => panic!("configured to trap"),
            Some(b"reject") => false,
            Some(b"tick-trap-once") => {
                self.set_tick_period(std::time::Duration::from_millis(5));
                true
            }
            _ => true,
        }
    }

    fn on_tick(&mut self) {
        if self.get_shared_data("bad.tick-trapped").0.is_none() {
            self.set_shared_data("bad.tick-trapped", Some(b"1"), None)
                .unwrap();
            panic!("trap in on_tick");
        }
        self.set_tick_period(std::time::Duration::ZERO);
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http;

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.get_http_request_header("x-trap").is_some() {
            panic!("asked to trap");
        }
        if self.get_http_request_header("x-loop").is_some() {
            let mut i = 0u64;
            loop {
                i = core::hint::black_box(i.wrapping_add(1));
            }
        }
        if self.get_http_request_header("x-grow").is_some() {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                let mut chunk = vec![0u8; 1 << 20];
                chunk[0] = 1;
                hoard.push(core::hint::black_box(chunk));
            }
        }
        self.set_http_request_header("x-bad-ok", Some("1"));
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.get_http_request_header("x-trap-response").is_some() {
            panic!("asked to trap in the response");
        }
        self.set_http_response_header("x-bad-resp", Some("1"));
        Action::Continue
    }
}
