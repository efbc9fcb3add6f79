//! Example filter: adds `x-weir-example: <configured value>` to every response.
//!
//! The plugin configuration is the header value as raw bytes (default `hello`).

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(AddHeaderRoot { value: Rc::from("hello") })
    });
}}

struct AddHeaderRoot {
    value: Rc<str>,
}

impl Context for AddHeaderRoot {}

impl RootContext for AddHeaderRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        if let Some(bytes) = self.get_plugin_configuration() {
            match String::from_utf8(bytes) {
                Ok(v) if !v.is_empty() => self.value = Rc::from(v.trim()),
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(AddHeader {
            value: self.value.clone(),
        }))
    }
}

struct AddHeader {
    value: Rc<str>,
}

impl Context for AddHeader {}

impl HttpContext for AddHeader {
    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.add_http_response_header("x-weir-example", &self.value);
        Action::Continue
    }
}
