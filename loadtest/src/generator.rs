//! The load generator: closed loop (N connections, as fast as they go) or open loop (constant
//! rate, latency from each request's intended send time), over HTTP/1.1, h2c or TLS, optionally
//! with a new connection (and a full TLS handshake) for every request.
//!
//! Every connection (or HTTP/2 stream) is a worker that sends one request, reads the whole body,
//! and only then sends the next. Workers keep their own histogram and counters; they are merged
//! at the end, so the hot path shares nothing but two relaxed counters for the progress bar.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use http::{HeaderValue, Request, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::report::{Latencies, RunReport};
use crate::schedule::{Schedule, Tickets};

/// The protocol the generator speaks.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum Protocol {
    /// HTTP/1.1 over plain TCP.
    H1,
    /// HTTP/2 over plain TCP, with prior knowledge.
    H2c,
    /// HTTP/1.1 over TLS (ALPN `http/1.1`).
    H1Tls,
    /// HTTP/2 over TLS (ALPN `h2`).
    H2Tls,
}

impl Protocol {
    /// Whether the protocol runs over TLS.
    pub fn is_tls(self) -> bool {
        matches!(self, Self::H1Tls | Self::H2Tls)
    }

    /// Whether the protocol is HTTP/2.
    pub fn is_h2(self) -> bool {
        matches!(self, Self::H2c | Self::H2Tls)
    }

    /// The ALPN protocol to offer.
    pub fn alpn(self) -> &'static [u8] {
        if self.is_h2() { b"h2" } else { b"http/1.1" }
    }

    /// The short name used in reports: `h1`, `h2c`, `h1-tls`, `h2-tls`.
    pub fn name(self) -> &'static str {
        match self {
            Self::H1 => "h1",
            Self::H2c => "h2c",
            Self::H1Tls => "h1-tls",
            Self::H2Tls => "h2-tls",
        }
    }
}

/// Closed or open loop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Each worker sends its next request as soon as the previous response is complete.
    Closed,
    /// Requests are due at a constant rate (per second, all workers together).
    Open {
        /// Requests per second.
        rate: f64,
    },
}

/// One request the generator sends: the `Host` (or `:authority`) and the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Host header value, e.g. `api.example.com` or `127.0.0.1:8080`.
    pub host: String,
    /// Path and query, starting with `/`.
    pub path: String,
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Free-form label copied into the report.
    pub label: String,
    /// Address to connect to.
    pub addr: SocketAddr,
    /// Protocol to speak.
    pub protocol: Protocol,
    /// Open a new connection for every request (with TLS: a full handshake each time).
    pub new_connection_per_request: bool,
    /// Connections (with a new connection per request: concurrent requests).
    pub connections: usize,
    /// Concurrent streams per connection; must be 1 for HTTP/1.1.
    pub streams: usize,
    /// Closed or open loop.
    pub mode: Mode,
    /// Time before the measured window; nothing sent then is counted.
    pub warmup: Duration,
    /// Length of the measured window.
    pub duration: Duration,
    /// Longest wait for one response (connect included); past it the request is an error.
    pub timeout: Duration,
    /// Requests to send, in turn (worker `w` starts at `w mod len`).
    pub targets: Vec<Target>,
    /// Extra request headers sent with every request (e.g. `authorization`).
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
    /// TLS client configuration, required for TLS protocols (its ALPN is set per protocol).
    pub tls: Option<Arc<ClientConfig>>,
    /// SNI and certificate name to expect.
    pub server_name: String,
    /// Draw a progress bar on stderr (when it is a terminal).
    pub progress: bool,
}

impl LoadConfig {
    /// A closed-loop HTTP/1.1 configuration for `GET path` on `addr`, 1 s long, no warm-up.
    pub fn new(addr: SocketAddr, path: &str) -> Self {
        Self {
            label: addr.to_string(),
            addr,
            protocol: Protocol::H1,
            new_connection_per_request: false,
            connections: 16,
            streams: 1,
            mode: Mode::Closed,
            warmup: Duration::ZERO,
            duration: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
            targets: vec![Target {
                host: addr.to_string(),
                path: path.to_string(),
            }],
            headers: Vec::new(),
            tls: None,
            server_name: "localhost".into(),
            progress: false,
        }
    }
}

/// A configuration the generator cannot run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The configuration is inconsistent.
    #[error("invalid load configuration: {0}")]
    Config(String),
}

/// Live counters for the progress bar.
#[derive(Debug, Default)]
struct Live {
    ok: AtomicU64,
    failed: AtomicU64,
}

struct Shared {
    cfg: LoadConfig,
    requests: Vec<(Uri, HeaderValue)>,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    measure_start: Instant,
    end: Instant,
    tickets: Option<Tickets>,
    /// Open loop: one permit per request that has fallen due (see [`crate::schedule::pace`]).
    due: tokio::sync::Semaphore,
    live: Live,
}

#[derive(Debug, Default)]
struct Stats {
    latencies: Latencies,
    ok: u64,
    non_2xx: u64,
    errors: u64,
    body_bytes: u64,
    /// When the last counted 2xx response ended.
    last_done: Option<Instant>,
}

impl Stats {
    fn merge(&mut self, other: &Stats) {
        self.latencies.merge(&other.latencies);
        self.last_done = self.last_done.max(other.last_done);
        self.ok += other.ok;
        self.non_2xx += other.non_2xx;
        self.errors += other.errors;
        self.body_bytes += other.body_bytes;
    }
}

enum Sender {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

/// Why a worker stopped.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// The run is over.
    Done,
    /// The connection is gone; open another.
    Reconnect,
}

impl Sender {
    /// Waits until the connection can take a request; an error means it is closed.
    async fn ready(&mut self) -> Result<(), hyper::Error> {
        match self {
            Self::H1(s) => s.ready().await,
            Self::H2(s) => s.ready().await,
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Self::H1(s) => s.is_closed(),
            Self::H2(s) => s.is_closed(),
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn validate(cfg: &LoadConfig) -> Result<(), LoadError> {
    let err = |m: &str| Err(LoadError::Config(m.to_string()));
    if cfg.connections == 0 {
        return err("connections must be at least 1");
    }
    if cfg.streams == 0 {
        return err("streams must be at least 1");
    }
    if cfg.streams > 1 && !cfg.protocol.is_h2() {
        return err("more than one stream per connection needs HTTP/2 (h2c or h2-tls)");
    }
    if cfg.streams > 1 && cfg.new_connection_per_request {
        return err("a new connection per request carries one stream");
    }
    if cfg.protocol.is_tls() && cfg.tls.is_none() {
        return err("TLS protocols need a CA to trust (--ca)");
    }
    if cfg.targets.is_empty() {
        return err("no target to request");
    }
    if cfg.duration.is_zero() {
        return err("duration must be positive");
    }
    if let Mode::Open { rate } = cfg.mode
        && !(rate.is_finite() && rate > 0.0)
    {
        return err("rate must be positive");
    }
    Ok(())
}

fn build_requests(cfg: &LoadConfig) -> Result<Vec<(Uri, HeaderValue)>, LoadError> {
    let scheme = if cfg.protocol.is_tls() {
        "https"
    } else {
        "http"
    };
    cfg.targets
        .iter()
        .map(|t| {
            if !t.path.starts_with('/') {
                return Err(LoadError::Config(format!(
                    "path {:?} does not start with /",
                    t.path
                )));
            }
            // HTTP/2 carries the host in :authority (taken from an absolute URI); HTTP/1.1 in
            // the Host header with an origin-form path.
            let uri: Uri = if cfg.protocol.is_h2() {
                format!("{scheme}://{}{}", t.host, t.path).parse()
            } else {
                t.path.parse()
            }
            .map_err(|e| LoadError::Config(format!("bad target {} {}: {e}", t.host, t.path)))?;
            let host = HeaderValue::from_str(&t.host)
                .map_err(|e| LoadError::Config(format!("bad host {:?}: {e}", t.host)))?;
            Ok((uri, host))
        })
        .collect()
}

/// Runs the load described by `cfg` and reports what was measured.
///
/// Must be called inside a tokio runtime; the workers are spawned on it.
pub async fn run(mut cfg: LoadConfig) -> Result<RunReport, LoadError> {
    validate(&cfg)?;
    let requests = build_requests(&cfg)?;
    let tls = match &cfg.tls {
        Some(base) if cfg.protocol.is_tls() => {
            let mut config = (**base).clone();
            config.alpn_protocols = vec![cfg.protocol.alpn().to_vec()];
            let name = ServerName::try_from(cfg.server_name.clone()).map_err(|e| {
                LoadError::Config(format!("bad server name {:?}: {e}", cfg.server_name))
            })?;
            Some((TlsConnector::from(Arc::new(config)), name))
        }
        _ => None,
    };
    let start = Instant::now();
    let measure_start = start + cfg.warmup;
    let end = measure_start + cfg.duration;
    let tickets = match cfg.mode {
        Mode::Closed => None,
        Mode::Open { rate } => Some(Tickets::new(Schedule::new(
            start,
            rate,
            cfg.warmup + cfg.duration,
        ))),
    };
    let progress = std::mem::take(&mut cfg.progress);
    let shared = Arc::new(Shared {
        cfg,
        requests,
        tls,
        measure_start,
        end,
        tickets,
        due: tokio::sync::Semaphore::new(0),
        live: Live::default(),
    });
    if let Some(t) = &shared.tickets {
        let schedule = *t.schedule();
        let workers = shared.cfg.connections * shared.cfg.streams;
        let pacer = shared.clone();
        std::thread::Builder::new()
            .name("weir-load-pacer".into())
            .spawn(move || crate::schedule::pace(schedule, &pacer.due, workers))
            .map_err(|e| LoadError::Config(format!("starting the pacing thread: {e}")))?;
    }

    let bar = progress.then(|| spawn_progress(shared.clone()));
    let tasks: Vec<_> = (0..shared.cfg.connections)
        .map(|id| tokio::spawn(connection_task(shared.clone(), id)))
        .collect();
    let mut stats = Stats::default();
    for task in join_all(tasks).await {
        // A worker that panicked lost its counts; that is a bug, and the panic is re-raised.
        match task {
            Ok(s) => stats.merge(&s),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    if let Some((bar, handle)) = bar {
        handle.abort();
        bar.finish_and_clear();
    }
    if let Some(t) = &shared.tickets {
        stats.errors += unsent_in_window(t, measure_start);
    }
    Ok(report(&shared, &stats))
}

/// Scheduled requests of the window that were never sent: each one is a failed request.
fn unsent_in_window(tickets: &Tickets, measure_start: Instant) -> u64 {
    let s = tickets.schedule();
    (tickets.claimed()..s.len())
        .filter(|&i| s.intended(i).is_some_and(|at| at >= measure_start))
        .count() as u64
}

/// The time the counted responses took: the window, or longer when the last one came after it.
fn served_over(shared: &Shared, stats: &Stats) -> Duration {
    let late = stats.last_done.map_or(Duration::ZERO, |t| {
        t.saturating_duration_since(shared.measure_start)
    });
    late.max(shared.cfg.duration)
}

fn report(shared: &Shared, stats: &Stats) -> RunReport {
    let cfg = &shared.cfg;
    let secs = cfg.duration.as_secs_f64();
    RunReport {
        label: cfg.label.clone(),
        mode: match cfg.mode {
            Mode::Closed => "closed",
            Mode::Open { .. } => "open",
        }
        .into(),
        protocol: cfg.protocol.name().into(),
        new_connection_per_request: cfg.new_connection_per_request,
        target: cfg.addr.to_string(),
        connections: cfg.connections,
        streams_per_connection: cfg.streams,
        rate: match cfg.mode {
            Mode::Closed => None,
            Mode::Open { rate } => Some(rate),
        },
        warmup_s: cfg.warmup.as_secs_f64(),
        duration_s: secs,
        ok: stats.ok,
        non_2xx: stats.non_2xx,
        errors: stats.errors,
        // Over the window, or until the last response when that came later: an open loop that
        // the server could not follow served its requests over a longer time than the window.
        throughput_rps: stats.ok as f64 / served_over(shared, stats).as_secs_f64(),
        body_bytes: stats.body_bytes,
        latency: stats.latencies.summary(),
        latency_curve: stats.latencies.curve(),
        proxy_cpu_us_per_response: None,
    }
}

fn spawn_progress(shared: Arc<Shared>) -> (ProgressBar, tokio::task::JoinHandle<()>) {
    let total = shared.cfg.warmup + shared.cfg.duration;
    let bar =
        ProgressBar::with_draw_target(Some(total.as_millis() as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {elapsed:>3}/{duration} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(shared.cfg.label.clone());
    let b = bar.clone();
    let handle = tokio::spawn(async move {
        let start = shared.measure_start - shared.cfg.warmup;
        let (mut last_ok, mut last_t) = (0u64, Instant::now());
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = Instant::now();
            let ok = shared.live.ok.load(Ordering::Relaxed);
            let failed = shared.live.failed.load(Ordering::Relaxed);
            let rps = (ok - last_ok) as f64 / (now - last_t).as_secs_f64();
            (last_ok, last_t) = (ok, now);
            let phase = if now < shared.measure_start {
                "warm-up"
            } else {
                "measuring"
            };
            b.set_position((now - start).as_millis() as u64);
            b.set_message(format!(
                "{phase} {} req/s, {failed} failed",
                crate::report::fmt_rate(rps)
            ));
        }
    });
    (bar, handle)
}

async fn handshake<IO>(io: IO, h2: bool) -> Result<Sender, BoxError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    if h2 {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .handshake(io)
            .await?;
        tokio::spawn(conn);
        Ok(Sender::H2(sender))
    } else {
        let (sender, conn) = http1::Builder::new().handshake(io).await?;
        tokio::spawn(conn);
        Ok(Sender::H1(sender))
    }
}

async fn connect(shared: &Shared) -> Result<Sender, BoxError> {
    let tcp = TcpStream::connect(shared.cfg.addr).await?;
    tcp.set_nodelay(true)?;
    let h2 = shared.cfg.protocol.is_h2();
    match &shared.tls {
        None => handshake(tcp, h2).await,
        Some((connector, name)) => {
            let tls = connector.connect(name.clone(), tcp).await?;
            handshake(tls, h2).await
        }
    }
}

/// Sends one request and reads the whole body: the status and the body length.
async fn exchange(
    sender: &mut Sender,
    uri: &Uri,
    host: &HeaderValue,
    extra: &[(header::HeaderName, HeaderValue)],
    close: bool,
) -> Result<(u16, u64), BoxError> {
    let mut builder = Request::get(uri.clone());
    for (name, value) in extra {
        builder = builder.header(name, value);
    }
    let resp = match sender {
        Sender::H1(s) => {
            builder = builder.header(header::HOST, host.clone());
            if close {
                builder = builder.header(header::CONNECTION, HeaderValue::from_static("close"));
            }
            s.send_request(builder.body(Empty::new())?).await?
        }
        Sender::H2(s) => s.send_request(builder.body(Empty::new())?).await?,
    };
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            len += data.len() as u64;
        }
    }
    Ok((status, len))
}

impl Shared {
    /// The start time of the next request (now, or the intended time of the next ticket after
    /// waiting for it) and whether it falls in the measured window; `None` when the run is over.
    async fn next_slot(&self) -> Option<(Instant, bool)> {
        match &self.tickets {
            None => {
                let now = Instant::now();
                (now < self.end).then_some((now, now >= self.measure_start))
            }
            Some(t) => {
                self.due.acquire().await.ok()?.forget();
                let (_, at) = t.claim()?;
                Some((at, at >= self.measure_start))
            }
        }
    }

    fn over(&self) -> bool {
        match &self.tickets {
            None => Instant::now() >= self.end,
            // An open loop also ends once its last request has had its time, even if some
            // tickets were never claimed (a server that refuses connections).
            Some(t) => t.exhausted() || Instant::now() >= self.end + self.cfg.timeout,
        }
    }

    /// Records the end of a request that started at `started`.
    fn record(
        &self,
        stats: &mut Stats,
        started: Instant,
        in_window: bool,
        result: Result<Result<(u16, u64), BoxError>, tokio::time::error::Elapsed>,
    ) -> bool {
        let done = Instant::now();
        // In a closed loop the window is exact: what ends after it is left out. In an open loop
        // every scheduled request in the window counts, however late it ends.
        let counted = in_window && (self.tickets.is_some() || done <= self.end);
        match result {
            Ok(Ok((status, bytes))) => {
                if (200..300).contains(&status) {
                    self.live.ok.fetch_add(1, Ordering::Relaxed);
                    if counted {
                        stats.ok += 1;
                        stats.latencies.record(done - started);
                        stats.last_done = stats.last_done.max(Some(done));
                    }
                } else {
                    self.live.failed.fetch_add(1, Ordering::Relaxed);
                    if counted {
                        stats.non_2xx += 1;
                    }
                }
                if counted {
                    stats.body_bytes += bytes;
                }
                true
            }
            Ok(Err(_)) | Err(_) => {
                self.live.failed.fetch_add(1, Ordering::Relaxed);
                if counted {
                    stats.errors += 1;
                }
                false
            }
        }
    }
}

async fn connection_task(shared: Arc<Shared>, id: usize) -> Stats {
    let mut stats = Stats::default();
    if shared.cfg.new_connection_per_request {
        per_request_loop(&shared, id, &mut stats).await;
        return stats;
    }
    let streams = shared.cfg.streams;
    loop {
        if shared.over() {
            break;
        }
        let sender = match tokio::time::timeout(shared.cfg.timeout, connect(&shared)).await {
            Ok(Ok(sender)) => sender,
            failed => {
                // In a closed loop a failed connect is a failed request (if in the window). In
                // an open loop it is not: the requests it kept from being sent are counted when
                // the run ends. Then back off a little so a dead server is not hammered.
                let now = Instant::now();
                shared.live.failed.fetch_add(1, Ordering::Relaxed);
                if shared.tickets.is_none() && now >= shared.measure_start && now <= shared.end {
                    stats.errors += 1;
                }
                drop(failed);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let results = match sender {
            Sender::H2(h2) => {
                join_all(
                    (0..streams)
                        .map(|k| stream_loop(&shared, Sender::H2(h2.clone()), id * streams + k)),
                )
                .await
            }
            // HTTP/1.1 carries one request at a time (validated: streams == 1).
            h1 => vec![stream_loop(&shared, h1, id).await],
        };
        let mut done = false;
        for (s, outcome) in results {
            stats.merge(&s);
            done |= outcome == Outcome::Done;
        }
        if done {
            break;
        }
    }
    stats
}

async fn stream_loop(shared: &Shared, mut sender: Sender, worker: usize) -> (Stats, Outcome) {
    let mut stats = Stats::default();
    let mut next = worker % shared.requests.len();
    loop {
        // A connection the server closed cleanly (keep-alive limit) is replaced without counting
        // an error; this happens before the next request's clock starts.
        if sender.ready().await.is_err() {
            return (stats, Outcome::Reconnect);
        }
        let Some((started, in_window)) = shared.next_slot().await else {
            return (stats, Outcome::Done);
        };
        let (uri, host) = &shared.requests[next];
        next = (next + 1) % shared.requests.len();
        let result = tokio::time::timeout(
            shared.cfg.timeout,
            exchange(&mut sender, uri, host, &shared.cfg.headers, false),
        )
        .await;
        let ok = shared.record(&mut stats, started, in_window, result);
        if !ok && (matches!(sender, Sender::H1(_)) || sender.is_closed()) {
            return (stats, Outcome::Reconnect);
        }
    }
}

async fn per_request_loop(shared: &Shared, worker: usize, stats: &mut Stats) {
    let mut next = worker % shared.requests.len();
    while let Some((started, in_window)) = shared.next_slot().await {
        let (uri, host) = &shared.requests[next];
        next = (next + 1) % shared.requests.len();
        let result = tokio::time::timeout(shared.cfg.timeout, async {
            let mut sender = connect(shared).await?;
            exchange(&mut sender, uri, host, &shared.cfg.headers, true).await
        })
        .await;
        if !shared.record(stats, started, in_window, result) {
            // Do not spin on a dead server.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Sends one request as `cfg` describes (its first target) on a fresh connection and returns
/// the status; used to wait until a server is ready.
pub async fn probe(cfg: &LoadConfig) -> Result<u16, String> {
    let shared = shared_for(cfg.clone()).map_err(|e| e.to_string())?;
    let (uri, host) = &shared.requests[0];
    let attempt = async {
        let mut sender = connect(&shared).await?;
        let (status, _) = exchange(&mut sender, uri, host, &shared.cfg.headers, true).await?;
        Ok::<_, BoxError>(status)
    };
    match tokio::time::timeout(cfg.timeout, attempt).await {
        Ok(Ok(status)) => Ok(status),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// A [`Shared`] for one-off connections (no run, no window).
fn shared_for(mut cfg: LoadConfig) -> Result<Shared, LoadError> {
    cfg.new_connection_per_request = false;
    validate(&cfg)?;
    let requests = build_requests(&cfg)?;
    let tls = match &cfg.tls {
        Some(base) if cfg.protocol.is_tls() => {
            let mut config = (**base).clone();
            config.alpn_protocols = vec![cfg.protocol.alpn().to_vec()];
            let name = ServerName::try_from(cfg.server_name.clone())
                .map_err(|e| LoadError::Config(e.to_string()))?;
            Some((TlsConnector::from(Arc::new(config)), name))
        }
        _ => None,
    };
    let now = Instant::now();
    Ok(Shared {
        cfg,
        requests,
        tls,
        measure_start: now,
        end: now,
        tickets: None,
        due: tokio::sync::Semaphore::new(0),
        live: Live::default(),
    })
}

/// What [`hold_idle`] achieved.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct IdleReport {
    /// Connections asked for.
    pub requested: usize,
    /// Connections that completed one request and were then held open.
    pub open: usize,
    /// Connections that failed to open or to answer their first request.
    pub failed: usize,
    /// Connections still open (not closed by the server) at the end of the hold.
    pub still_open: usize,
}

/// Opens `count` connections, sends one request on each so that it is fully set up, then keeps
/// them all open and idle. `on_ready` is called once they are all open (or failed); the
/// connections are held for `hold` after that.
pub async fn hold_idle(
    cfg: &LoadConfig,
    count: usize,
    hold: Duration,
    on_ready: impl FnOnce(&IdleReport),
) -> Result<IdleReport, LoadError> {
    use futures_util::StreamExt;
    let shared = shared_for(cfg.clone())?;
    let shared = &shared;
    let senders: Vec<Option<Sender>> = futures_util::stream::iter(0..count)
        .map(|i| async move {
            let (uri, host) = &shared.requests[i % shared.requests.len()];
            let attempt = async {
                let mut sender = connect(shared).await?;
                let (status, _) =
                    exchange(&mut sender, uri, host, &shared.cfg.headers, false).await?;
                if (200..300).contains(&status) {
                    Ok(sender)
                } else {
                    Err(BoxError::from(format!("status {status}")))
                }
            };
            tokio::time::timeout(shared.cfg.timeout, attempt)
                .await
                .ok()
                .and_then(Result::ok)
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let open = senders.iter().filter(|s| s.is_some()).count();
    let mut report = IdleReport {
        requested: count,
        open,
        failed: count - open,
        still_open: 0,
    };
    on_ready(&report);
    tokio::time::sleep(hold).await;
    report.still_open = senders.iter().flatten().filter(|s| !s.is_closed()).count();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LoadConfig {
        LoadConfig::new("127.0.0.1:1".parse().unwrap(), "/")
    }

    #[test]
    fn validation_rejects_inconsistent_configs() {
        assert!(validate(&cfg()).is_ok());
        let bad: Vec<fn(&mut LoadConfig)> = vec![
            |c| c.connections = 0,
            |c| c.streams = 2,
            |c| c.protocol = Protocol::H1Tls,
            |c| c.targets.clear(),
            |c| c.duration = Duration::ZERO,
            |c| c.mode = Mode::Open { rate: 0.0 },
            |c| {
                c.protocol = Protocol::H2c;
                c.streams = 2;
                c.new_connection_per_request = true;
            },
        ];
        for (i, f) in bad.iter().enumerate() {
            let mut c = cfg();
            f(&mut c);
            assert!(validate(&c).is_err(), "case {i}");
        }
        let mut c = cfg();
        c.protocol = Protocol::H2c;
        c.streams = 8;
        assert!(validate(&c).is_ok());
    }

    #[test]
    fn requests_use_origin_form_for_h1_and_authority_for_h2() {
        let mut c = cfg();
        c.targets = vec![Target {
            host: "a.example.com".into(),
            path: "/x?y=1".into(),
        }];
        let r = build_requests(&c).unwrap();
        assert_eq!(r[0].0.to_string(), "/x?y=1");
        assert_eq!(r[0].1, "a.example.com");
        c.protocol = Protocol::H2c;
        let r = build_requests(&c).unwrap();
        assert_eq!(r[0].0.to_string(), "http://a.example.com/x?y=1");
        c.targets[0].path = "nope".into();
        assert!(build_requests(&c).is_err());
    }

    #[test]
    fn protocol_names() {
        assert_eq!(Protocol::H2Tls.name(), "h2-tls");
        assert!(Protocol::H2Tls.is_tls() && Protocol::H2Tls.is_h2());
        assert!(!Protocol::H1.is_tls() && !Protocol::H1.is_h2());
        assert_eq!(Protocol::H1Tls.alpn(), b"http/1.1");
    }
}
