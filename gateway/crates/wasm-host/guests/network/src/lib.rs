//! Test guest for network (TCP) filters: every network callback and buffers 2 and 3.
//!
//! Plugin configuration: comma-separated words.
//! - `upper`: upper-case the downstream data (replaces buffer 2).
//! - `min=N`: pause the downstream data until N bytes are held (or the end of stream).
//! - `tag`: wrap each upstream chunk in `[` `]` (prepend and append to buffer 3).
//! - `pause-up=N`: pause the upstream data until N bytes are held.
//! - `callout`: on a new connection, call cluster `auth` (`x-user` = the `user=NAME` word)
//!   and pause (also the downstream data) until it answers: a 200 resumes the downstream,
//!   anything else closes the connection.
//! - `tick`: pause on a new connection until the root context's next tick (5 ms) resumes it.
//!
//! Always: downstream data containing `QUIT` closes the connection (stream 2), `TRAP` panics;
//! upstream data containing `BYE` closes it through stream 3. Logs (`proxy_log`): `new
//! connection ...` with properties, `downstream close peer=N`, `upstream close peer=N`,
//! `done`, `log down=... up=... upstream=...` (bytes passed on in each direction). Counter
//! `guest_net.connections` counts connections.

use std::cell::RefCell;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, RootContext, StreamContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType, PeerType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { config: String::new(), connections: 0 })
    });
}}

thread_local! {
    /// Connections paused until the next tick.
    static WAITING: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

fn log(message: &str) {
    hostcalls::log(LogLevel::Info, message).unwrap();
}

/// A string property, or `none`.
fn property(path: &[&str]) -> String {
    match hostcalls::get_property(path.to_vec()).unwrap() {
        None => "none".into(),
        Some(v) => String::from_utf8_lossy(&v).into_owned(),
    }
}

/// An integer property (8 bytes, little-endian), or `none`.
fn number(path: &[&str]) -> String {
    match hostcalls::get_property(path.to_vec()).unwrap() {
        None => "none".into(),
        Some(v) => u64::from_le_bytes(v.try_into().unwrap()).to_string(),
    }
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_continue_stream(stream_type: u32) -> u32;
}

/// `proxy_continue_stream` with its raw status (the SDK panics on anything but OK).
fn continue_stream_status(stream_type: u32) -> u32 {
    // SAFETY: a host function taking and returning integers.
    unsafe { proxy_continue_stream(stream_type) }
}

struct Root {
    config: String,
    connections: u32,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        self.config = self
            .get_plugin_configuration()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        self.connections =
            hostcalls::define_metric(MetricType::Counter, "guest_net.connections").unwrap();
        if self.config.split(',').any(|w| w == "tick") {
            self.set_tick_period(Duration::from_millis(5));
        }
        true
    }

    fn on_tick(&mut self) {
        for id in WAITING.with(|w| std::mem::take(&mut *w.borrow_mut())) {
            hostcalls::set_effective_context(id).unwrap();
            hostcalls::resume_downstream().unwrap();
        }
    }

    fn create_stream_context(&self, id: u32) -> Option<Box<dyn StreamContext>> {
        let words: Vec<String> = self.config.split(',').map(str::to_owned).collect();
        let number = |key: &str| {
            words
                .iter()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        };
        Some(Box::new(Conn {
            id,
            upper: words.iter().any(|w| w == "upper"),
            tag: words.iter().any(|w| w == "tag"),
            callout: words.iter().any(|w| w == "callout"),
            tick: words.iter().any(|w| w == "tick"),
            min: number("min"),
            pause_up: number("pause-up"),
            user: words
                .iter()
                .find_map(|w| w.strip_prefix("user="))
                .unwrap_or("")
                .to_owned(),
            connections: self.connections,
            authorizing: false,
            down: 0,
            up: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::StreamContext)
    }
}

struct Conn {
    id: u32,
    upper: bool,
    tag: bool,
    callout: bool,
    tick: bool,
    min: Option<usize>,
    pause_up: Option<usize>,
    user: String,
    connections: u32,
    /// The `auth` callout has not answered yet.
    authorizing: bool,
    down: usize,
    up: usize,
}

impl Context for Conn {
    fn on_http_call_response(&mut self, _token: u32, _nh: usize, _body: usize, _nt: usize) {
        let status = self
            .get_http_call_response_header(":status")
            .unwrap_or_default();
        log(&format!("callout answered {status}"));
        self.authorizing = false;
        if status == "200" {
            self.resume_downstream();
        } else {
            self.close_downstream();
        }
    }

    fn on_done(&mut self) -> bool {
        log("done");
        true
    }
}

impl StreamContext for Conn {
    fn on_new_connection(&mut self) -> Action {
        hostcalls::increment_metric(self.connections, 1).unwrap();
        log(&format!(
            "new connection source={} destination_port={} connection_id={} request_path={}",
            property(&["source", "address"]),
            number(&["destination", "port"]),
            number(&["connection_id"]),
            property(&["request", "path"]),
        ));
        // Streams 0 and 1 (HTTP request and response) do not exist on a connection.
        assert_eq!(continue_stream_status(0), 1);
        assert_eq!(continue_stream_status(1), 1);
        if self.callout {
            self.dispatch_http_call(
                "auth",
                vec![
                    (":method", "GET"),
                    (":path", "/check"),
                    (":authority", "auth"),
                    ("x-user", &self.user),
                ],
                None,
                vec![],
                Duration::from_secs(5),
            )
            .unwrap();
            self.authorizing = true;
            return Action::Pause;
        }
        if self.tick {
            WAITING.with(|w| w.borrow_mut().push(self.id));
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_downstream_data(&mut self, size: usize, end_of_stream: bool) -> Action {
        let data = self.get_downstream_data(0, size).unwrap_or_default();
        assert_eq!(data.len(), size);
        if data.windows(4).any(|w| w == b"TRAP") {
            panic!("TRAP in the downstream data");
        }
        if self.authorizing {
            return Action::Pause;
        }
        if data.windows(4).any(|w| w == b"QUIT") {
            log("closing on QUIT");
            self.close_downstream();
            return Action::Pause;
        }
        if self.min.is_some_and(|min| size < min) && !end_of_stream {
            return Action::Pause;
        }
        if self.upper {
            self.set_downstream_data(0, size, &data.to_ascii_uppercase());
        }
        self.down += size;
        Action::Continue
    }

    fn on_downstream_close(&mut self, peer_type: PeerType) {
        log(&format!("downstream close peer={}", peer_type as u32));
    }

    fn on_upstream_data(&mut self, size: usize, end_of_stream: bool) -> Action {
        let data = self.get_upstream_data(0, size).unwrap_or_default();
        assert_eq!(data.len(), size);
        if data.windows(3).any(|w| w == b"BYE") {
            log("closing on BYE");
            self.close_upstream();
            return Action::Pause;
        }
        if self.pause_up.is_some_and(|min| size < min) && !end_of_stream {
            return Action::Pause;
        }
        if self.tag && size > 0 {
            // Prepend (start 0, size 0) and append (start at the end), as in Envoy.
            self.set_upstream_data(0, 0, b"[");
            self.set_upstream_data(size + 1, 0, b"]");
        }
        self.up += size;
        Action::Continue
    }

    fn on_upstream_close(&mut self, peer_type: PeerType) {
        log(&format!("upstream close peer={}", peer_type as u32));
    }

    fn on_log(&mut self) {
        log(&format!(
            "log down={} up={} upstream={} cluster={}",
            self.down,
            self.up,
            property(&["upstream", "address"]),
            property(&["xds", "cluster_name"]),
        ));
    }
}
