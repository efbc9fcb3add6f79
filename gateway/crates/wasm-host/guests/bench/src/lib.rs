//! Benchmark guest: a no-op filter, or (configuration `mutate`) one that adds a request and a
//! response header.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { mutate: false }) });
}}

struct Root {
    mutate: bool,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        self.mutate = self.get_plugin_configuration().as_deref() == Some(b"mutate");
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            mutate: self.mutate,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    mutate: bool,
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.mutate {
            self.set_http_request_header("x-bench", Some("1"));
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.mutate {
            self.set_http_response_header("x-bench-resp", Some("1"));
        }
        Action::Continue
    }
}
