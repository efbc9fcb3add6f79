//! Test guest for gRPC streams (`proxy_grpc_stream`, send, cancel, close and their callbacks).
//!
//! Streams go to cluster `x-cluster` (default `echo`), method `weir.Echo/{x-method}` (default
//! `Chat`), with metadata `x-user: alice` and `x-status` copied from the request when present.
//!
//! Requests:
//! - `/chat`: sends the messages of `x-messages` (comma-separated, default `one,two,three`),
//!   half-closes (`x-half-close`: `end` sets `end_stream` on the last send, `none` does not
//!   half-close, anything else calls `proxy_grpc_close` after the sends) and pauses; when the
//!   stream closes it answers 200 with what it saw: `x-events` (`init`, `msg`, `trail`, `close`
//!   in order), `x-received` (messages joined by `|`), `x-initial` and `x-trailers` (metadata
//!   as `k=v` joined by `;`), `x-close-status` and `x-close-message` (`proxy_get_status`).
//! - `/cancel`: opens the stream and pauses; on the first message it cancels the stream and
//!   resumes with `x-first` (that message) and `x-send-after-cancel` (the status of a send on the
//!   cancelled token); the response headers get `x-messages-seen` (messages received in all).
//! - `/linger`: opens a stream, sends `x` and continues at once (the request ends first).
//! - `/trap`: panics (the VM is discarded, with the streams of every context in it).
//! - `/errors`: the statuses of an unknown cluster (`x-unknown-cluster`), of send, cancel and
//!   close on an unknown token (`x-unknown-send`, `-cancel`, `-close`) and of a send after
//!   `end_stream` (`x-send-after-end`), as request headers.
//! - `/root`: copies shared data `grpcstream.root` to request header `x-value`.
//!
//! Root context: with configuration `root-stream`, `on_configure` opens `weir.Echo/Chat` to
//! `echo`, sends `r1` and `r2` (`end_stream` on the last) and, when the stream closes, stores
//! what it saw in shared data `grpcstream.root` (`init,msg:r1,msg:r2,trail,close:0`).

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, Bytes, ContextType, LogLevel, Status};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// A status as a header value.
fn status_name<T>(r: Result<T, Status>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(Status::NotFound) => "not-found".into(),
        Err(Status::BadArgument) => "bad-argument".into(),
        Err(Status::ParseFailure) => "parse-failure".into(),
        Err(Status::InternalFailure) => "internal-failure".into(),
        Err(other) => format!("{other:?}"),
    }
}

/// Metadata as `k=v` pairs joined by `;`.
fn pairs(map: Vec<(String, Bytes)>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k}={}", String::from_utf8_lossy(v)))
        .collect::<Vec<_>>()
        .join(";")
}

/// What a context saw of its stream.
#[derive(Default)]
struct Seen {
    events: Vec<String>,
    received: Vec<String>,
    initial: String,
    trailers: String,
}

impl Seen {
    fn initial_metadata(&mut self, ctx: &dyn Context, n: u32) {
        let map = ctx.get_grpc_stream_initial_metadata();
        assert_eq!(map.len(), n as usize, "initial metadata size");
        self.initial = pairs(map);
        self.events.push("init".into());
    }

    fn message(&mut self, ctx: &mut dyn Context, size: usize) -> String {
        let body = ctx.get_grpc_stream_message(0, size).unwrap_or_default();
        assert_eq!(body.len(), size, "message size");
        let text = String::from_utf8_lossy(&body).into_owned();
        self.received.push(text.clone());
        text
    }

    fn trailing_metadata(&mut self, ctx: &dyn Context, n: u32) {
        let map = ctx.get_grpc_stream_trailing_metadata();
        assert_eq!(map.len(), n as usize, "trailing metadata size");
        self.trailers = pairs(map);
        self.events.push("trail".into());
    }
}

#[derive(Default)]
struct Root {
    seen: Seen,
}

impl Context for Root {
    fn on_grpc_stream_initial_metadata(&mut self, _token: u32, n: u32) {
        let mut seen = std::mem::take(&mut self.seen);
        seen.initial_metadata(self, n);
        self.seen = seen;
    }

    fn on_grpc_stream_message(&mut self, _token: u32, size: usize) {
        let mut seen = std::mem::take(&mut self.seen);
        let text = seen.message(self, size);
        seen.events.push(format!("msg:{text}"));
        self.seen = seen;
    }

    fn on_grpc_stream_trailing_metadata(&mut self, _token: u32, n: u32) {
        let mut seen = std::mem::take(&mut self.seen);
        seen.trailing_metadata(self, n);
        self.seen = seen;
    }

    fn on_grpc_stream_close(&mut self, _token: u32, status: u32) {
        self.seen.events.push(format!("close:{status}"));
        let value = self.seen.events.join(",");
        self.set_shared_data("grpcstream.root", Some(value.as_bytes()), None)
            .unwrap();
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self
            .get_plugin_configuration()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if config.split(',').any(|w| w == "root-stream") {
            let token = self
                .open_grpc_stream("echo", "weir.Echo", "Chat", vec![("x-user", b"root")])
                .unwrap();
            self.send_grpc_stream_message(token, Some(b"r1"), false);
            self.send_grpc_stream_message(token, Some(b"r2"), true);
        }
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http::default()))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

#[derive(Default, PartialEq, Eq)]
enum Mode {
    #[default]
    Plain,
    Chat,
    Cancel,
}

#[derive(Default)]
struct Http {
    mode: Mode,
    seen: Seen,
}

impl Http {
    fn header(&self, name: &str) -> Option<String> {
        self.get_http_request_header(name)
    }

    /// Open the stream the request asks for; a failure answers 500.
    fn open(&mut self) -> Option<u32> {
        let cluster = self.header("x-cluster").unwrap_or_else(|| "echo".into());
        let method = self.header("x-method").unwrap_or_else(|| "Chat".into());
        let status = self.header("x-status");
        let mut metadata: Vec<(&str, &[u8])> = vec![("x-user", b"alice")];
        if let Some(s) = &status {
            metadata.push(("x-status", s.as_bytes()));
        }
        match self.open_grpc_stream(&cluster, "weir.Echo", &method, metadata) {
            Ok(token) => Some(token),
            Err(e) => {
                let e = status_name::<()>(Err(e));
                self.send_http_response(500, vec![("x-open-error", &e)], None);
                None
            }
        }
    }

    fn errors(&mut self) {
        let unknown_cluster = self.open_grpc_stream("nope", "weir.Echo", "Chat", vec![]);
        let results = [
            ("x-unknown-cluster", status_name(unknown_cluster)),
            (
                "x-unknown-send",
                status_name(hostcalls::send_grpc_stream_message(4242, Some(b"x"), false)),
            ),
            (
                "x-unknown-cancel",
                status_name(hostcalls::cancel_grpc_stream(4242)),
            ),
            (
                "x-unknown-close",
                status_name(hostcalls::close_grpc_stream(4242)),
            ),
        ];
        for (name, value) in &results {
            self.set_http_request_header(name, Some(value));
        }
        let token = self
            .open_grpc_stream("echo", "weir.Echo", "Chat", vec![])
            .unwrap();
        self.send_grpc_stream_message(token, Some(b"a"), true);
        let again = hostcalls::send_grpc_stream_message(token, Some(b"b"), false);
        self.set_http_request_header("x-send-after-end", Some(&status_name(again)));
        self.cancel_grpc_stream(token);
    }
}

impl Context for Http {
    fn on_grpc_stream_initial_metadata(&mut self, _token: u32, n: u32) {
        let mut seen = std::mem::take(&mut self.seen);
        seen.initial_metadata(self, n);
        self.seen = seen;
    }

    fn on_grpc_stream_message(&mut self, token: u32, size: usize) {
        let mut seen = std::mem::take(&mut self.seen);
        let text = seen.message(self, size);
        seen.events.push("msg".into());
        let first = seen.received.len() == 1;
        self.seen = seen;
        if self.mode == Mode::Cancel && first {
            self.cancel_grpc_stream(token);
            let after = hostcalls::send_grpc_stream_message(token, Some(b"late"), false);
            self.set_http_request_header("x-first", Some(&text));
            self.set_http_request_header("x-send-after-cancel", Some(&status_name(after)));
            self.resume_http_request();
        }
    }

    fn on_grpc_stream_trailing_metadata(&mut self, _token: u32, n: u32) {
        let mut seen = std::mem::take(&mut self.seen);
        seen.trailing_metadata(self, n);
        self.seen = seen;
    }

    fn on_grpc_stream_close(&mut self, _token: u32, status: u32) {
        let (code, message) = self.get_grpc_status();
        assert_eq!(code, status, "proxy_get_status during on_grpc_close");
        self.seen.events.push("close".into());
        if self.mode != Mode::Chat {
            return;
        }
        let events = self.seen.events.join(",");
        let received = self.seen.received.join("|");
        let code = code.to_string();
        let message = message.unwrap_or_default();
        self.send_http_response(
            200,
            vec![
                ("x-events", &events),
                ("x-received", &received),
                ("x-initial", &self.seen.initial),
                ("x-trailers", &self.seen.trailers),
                ("x-close-status", &code),
                ("x-close-message", &message),
            ],
            Some(b"stream done"),
        );
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let path = self.header(":path").unwrap_or_default();
        match path.as_str() {
            "/chat" => {
                self.mode = Mode::Chat;
                let Some(token) = self.open() else {
                    return Action::Pause;
                };
                let list = self
                    .header("x-messages")
                    .unwrap_or_else(|| "one,two,three".into());
                let half_close = self.header("x-half-close").unwrap_or_default();
                let messages: Vec<&str> = list.split(',').collect();
                for (i, m) in messages.iter().enumerate() {
                    let end = half_close == "end" && i + 1 == messages.len();
                    self.send_grpc_stream_message(token, Some(m.as_bytes()), end);
                }
                if half_close != "end" && half_close != "none" {
                    self.close_grpc_stream(token);
                }
                Action::Pause
            }
            "/cancel" => {
                self.mode = Mode::Cancel;
                self.open();
                Action::Pause
            }
            "/linger" => {
                let Some(token) = self.open() else {
                    return Action::Pause;
                };
                self.send_grpc_stream_message(token, Some(b"x"), false);
                Action::Continue
            }
            "/trap" => panic!("asked to trap"),
            "/errors" => {
                self.errors();
                Action::Continue
            }
            "/root" => {
                let v = self
                    .get_shared_data("grpcstream.root")
                    .0
                    .map(|v| String::from_utf8_lossy(&v).into_owned())
                    .unwrap_or_else(|| "none".into());
                self.set_http_request_header("x-value", Some(&v));
                Action::Continue
            }
            _ => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.mode == Mode::Cancel {
            let seen = self.seen.received.len().to_string();
            self.set_http_response_header("x-messages-seen", Some(&seen));
            self.set_http_response_header("x-events", Some(&self.seen.events.join(",")));
        }
        Action::Continue
    }
}
