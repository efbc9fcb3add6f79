//! Test guest for callouts, timers and shared queues.
//!
//! Root context: registers queue `q1` (its `on_queue_ready` copies each item to shared data
//! `callout.queue-last`); with configuration word `tick`, ticks every 5 ms and counts ticks in
//! shared data `callout.ticks`; with `root-call`, calls cluster `auth` from `on_configure` and
//! stores the response status in `callout.root-call`.
//!
//! Requests: `/enqueue` enqueues the `x-item` header to `q1`; `/ticks` and `/queue-last` and
//! `/root-call` copy the shared values to response-visible request headers; `/bad-cluster`
//! calls an unknown cluster (HTTP and unary gRPC); anything else calls cluster `auth` (`GET /check`) and pauses: a
//! 200 answer resumes with `x-auth` set to its body, another status gets a 403 local reply, a
//! failed call a 502 with `x-status` = `proxy_get_status`'s code. `/grpc` makes a unary gRPC
//! call `weir.Auth/Check` to `auth`: OK resumes with `x-grpc` set to the reply, an error
//! status gets a 403 with `x-grpc-status`/`x-grpc-message`. `/async` makes the `auth` call
//! but continues at once (the answer is handled when it comes). `/wait` pauses until the next
//! tick (configuration `tick`), which answers it with a 202 local reply from the root context.
//! `/trap` panics.

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, Status};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { queue: 0 }) });
}}

struct Root {
    queue: u32,
}

fn shared_string(ctx: &dyn Context, key: &str) -> String {
    ctx.get_shared_data(key)
        .0
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .unwrap_or_else(|| "none".into())
}

impl Context for Root {
    fn on_http_call_response(&mut self, _token: u32, _nh: usize, _body: usize, _nt: usize) {
        let status = self
            .get_http_call_response_header(":status")
            .unwrap_or_else(|| "failed".into());
        self.set_shared_data("callout.root-call", Some(status.as_bytes()), None)
            .unwrap();
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self
            .get_plugin_configuration()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        self.queue = self.register_shared_queue("q1");
        for word in config.split(',') {
            match word {
                "tick" => self.set_tick_period(Duration::from_millis(5)),
                "root-call" => {
                    self.dispatch_http_call(
                        "auth",
                        vec![
                            (":method", "GET"),
                            (":path", "/root"),
                            (":authority", "auth"),
                        ],
                        None,
                        vec![],
                        Duration::from_secs(5),
                    )
                    .unwrap();
                }
                _ => {}
            }
        }
        true
    }

    fn on_tick(&mut self) {
        for id in WAITING.with(|w| std::mem::take(&mut *w.borrow_mut())) {
            hostcalls::set_effective_context(id).unwrap();
            hostcalls::send_http_response(202, vec![("x-released", "by-tick")], None).unwrap();
        }
        let (v, cas) = self.get_shared_data("callout.ticks");
        let n: u64 = v
            .map(|v| String::from_utf8_lossy(&v).parse().unwrap())
            .unwrap_or(0);
        let _ = self.set_shared_data("callout.ticks", Some((n + 1).to_string().as_bytes()), cas);
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        assert_eq!(queue_id, self.queue);
        while let Some(item) = self.dequeue_shared_queue(queue_id).unwrap() {
            self.set_shared_data("callout.queue-last", Some(&item), None)
                .unwrap();
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http { id: _id }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    id: u32,
}

thread_local! {
    /// Streams paused on `/wait`, released by the root context's next tick.
    static WAITING: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Context for Http {
    fn on_grpc_call_response(&mut self, _token: u32, status_code: u32, size: usize) {
        if status_code == 0 {
            let body = self
                .get_grpc_call_response_body(0, size)
                .unwrap_or_default();
            self.set_http_request_header("x-grpc", Some(&String::from_utf8_lossy(&body)));
            self.resume_http_request();
        } else {
            let (code, message) = hostcalls::get_grpc_status().unwrap();
            self.send_http_response(
                403,
                vec![
                    ("x-grpc-status", &code.to_string()),
                    ("x-grpc-message", &message.unwrap_or_default()),
                ],
                None,
            );
        }
    }

    fn on_http_call_response(&mut self, _token: u32, nh: usize, body_size: usize, _nt: usize) {
        if nh == 0 {
            let (code, msg) = hostcalls::get_grpc_status().unwrap();
            self.send_http_response(
                502,
                vec![
                    ("x-status", &code.to_string()),
                    ("x-status-message", &msg.unwrap_or_default()),
                ],
                None,
            );
            return;
        }
        let status = self.get_http_call_response_header(":status").unwrap();
        let headers = self.get_http_call_response_headers();
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        if status == "200" {
            self.set_http_request_header("x-auth", Some(&String::from_utf8_lossy(&body)));
            self.set_http_request_header("x-callout-headers", Some(&headers.len().to_string()));
            self.resume_http_request();
        } else {
            self.send_http_response(403, vec![("x-upstream-status", &status)], Some(b"no"));
        }
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        match path.as_str() {
            "/enqueue" => {
                let item = self.get_http_request_header("x-item").unwrap_or_default();
                let q = self.resolve_shared_queue("", "q1").expect("queue q1");
                self.enqueue_shared_queue(q, Some(item.as_bytes())).unwrap();
                assert_eq!(
                    hostcalls::resolve_shared_queue("", "no-such-queue"),
                    Ok(None)
                );
                Action::Continue
            }
            "/ticks" | "/queue-last" | "/root-call" => {
                let v = shared_string(self, &format!("callout.{}", &path[1..]));
                self.set_http_request_header("x-value", Some(&v));
                Action::Continue
            }
            "/grpc" => {
                let who = self.get_http_request_header("x-user").unwrap_or_default();
                self.dispatch_grpc_call(
                    "auth",
                    "weir.Auth",
                    "Check",
                    vec![("x-user", who.as_bytes())],
                    Some(b"ping"),
                    Duration::from_secs(5),
                )
                .unwrap();
                // A call that is cancelled at once never answers.
                let cancelled = self
                    .dispatch_grpc_call("auth", "weir.Auth", "Check", vec![], None, Duration::ZERO)
                    .unwrap();
                self.cancel_grpc_call(cancelled);
                Action::Pause
            }
            "/trap" => panic!("asked to trap"),
            "/wait" => {
                // Paused until the root context's timer releases the stream.
                WAITING.with(|w| w.borrow_mut().push(self.id));
                Action::Pause
            }
            "/bad-cluster" => {
                match self.dispatch_http_call(
                    "nope",
                    vec![(":method", "GET"), (":path", "/"), (":authority", "x")],
                    None,
                    vec![],
                    Duration::from_secs(1),
                ) {
                    Err(Status::BadArgument) => {
                        self.set_http_request_header("x-bad-cluster", Some("bad-argument"));
                    }
                    other => panic!("unexpected {other:?}"),
                }
                // A unary gRPC call to an unknown cluster: PARSE_FAILURE, as Envoy answers.
                match self.dispatch_grpc_call(
                    "nope",
                    "weir.Auth",
                    "Check",
                    vec![],
                    None,
                    Duration::from_secs(1),
                ) {
                    Err(Status::ParseFailure) => {
                        self.set_http_request_header("x-bad-grpc-cluster", Some("parse-failure"));
                    }
                    other => panic!("unexpected {other:?}"),
                }
                Action::Continue
            }
            _ => {
                let who = self.get_http_request_header("x-user").unwrap_or_default();
                self.dispatch_http_call(
                    "auth",
                    vec![
                        (":method", "GET"),
                        (":path", "/check"),
                        (":authority", "auth"),
                        ("x-user", &who),
                    ],
                    Some(b"question"),
                    vec![],
                    Duration::from_secs(5),
                )
                .unwrap();
                if path == "/async" {
                    // Fire and forget: the answer is handled whenever it comes.
                    Action::Continue
                } else {
                    Action::Pause
                }
            }
        }
    }
}
