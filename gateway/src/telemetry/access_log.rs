//! The access log: Envoy-compatible format strings or JSON lines, written by a background
//! thread. The request path formats one line and hands it over without blocking; when the
//! writer falls behind, lines are dropped and counted.

use std::fmt::Write as _;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName};

use super::metrics::Registry;

/// Envoy's default access log format.
pub const DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"";

/// One piece of a compiled format.
#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    /// Request header (or pseudo-header), with an alternative and a max length.
    Req(HeaderKey, Option<HeaderKey>, Option<usize>),
    /// Response header.
    Resp(HeaderKey, Option<HeaderKey>, Option<usize>),
    StartTime,
    Duration,
    ResponseDuration,
    ResponseCode,
    ResponseCodeDetails,
    ResponseFlags,
    BytesReceived,
    BytesSent,
    Protocol,
    UpstreamHost,
    UpstreamCluster,
    RouteName,
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    DownstreamLocalAddress,
    RequestedServerName,
    UpstreamTransportFailureReason,
    Hostname,
}

/// A header reference in a format: a pseudo-header or a real header.
#[derive(Debug, Clone, PartialEq)]
enum HeaderKey {
    Method,
    Path,
    Authority,
    Scheme,
    Status,
    Name(HeaderName),
}

impl HeaderKey {
    fn parse(s: &str) -> Result<HeaderKey, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            ":method" => HeaderKey::Method,
            ":path" => HeaderKey::Path,
            ":authority" | "host" => HeaderKey::Authority,
            ":scheme" => HeaderKey::Scheme,
            ":status" => HeaderKey::Status,
            other => HeaderKey::Name(
                HeaderName::from_bytes(other.as_bytes())
                    .map_err(|_| format!("invalid header name `{s}`"))?,
            ),
        })
    }
}

/// A compiled access-log format.
#[derive(Debug, Clone)]
pub struct Format(FormatKind);

#[derive(Debug, Clone)]
enum FormatKind {
    /// A line of text.
    Text(Vec<Piece>),
    /// A JSON object of named fields.
    Json(Vec<(String, Vec<Piece>)>),
}

/// Parse an Envoy format string.
fn parse_pieces(fmt: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut rest = fmt;
    while let Some(start) = rest.find('%') {
        text.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        if let Some(stripped) = after.strip_prefix('%') {
            text.push('%');
            rest = stripped;
            continue;
        }
        let end = after.find('%').ok_or_else(|| {
            format!(
                "unterminated `%` command in access log format at `{}`",
                &rest[start..]
            )
        })?;
        let command = &after[..end];
        if !text.is_empty() {
            pieces.push(Piece::Text(std::mem::take(&mut text)));
        }
        pieces.push(parse_command(command)?);
        rest = &after[end + 1..];
    }
    text.push_str(rest);
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

fn parse_command(command: &str) -> Result<Piece, String> {
    let header = |args: &str| -> Result<(HeaderKey, Option<HeaderKey>, Option<usize>), String> {
        let (inner, max) = match args.rsplit_once("):") {
            Some((inner, max)) => (
                inner,
                Some(
                    max.parse::<usize>()
                        .map_err(|_| format!("invalid max length in `%{command}%`"))?,
                ),
            ),
            None => (
                args.strip_suffix(')')
                    .ok_or_else(|| format!("missing `)` in `%{command}%`"))?,
                None,
            ),
        };
        let (main, alt) = match inner.split_once('?') {
            Some((a, b)) => (a, Some(HeaderKey::parse(b)?)),
            None => (inner, None),
        };
        Ok((HeaderKey::parse(main)?, alt, max))
    };
    if let Some(args) = command.strip_prefix("REQ(") {
        let (a, b, m) = header(args)?;
        return Ok(Piece::Req(a, b, m));
    }
    if let Some(args) = command.strip_prefix("RESP(") {
        let (a, b, m) = header(args)?;
        return Ok(Piece::Resp(a, b, m));
    }
    Ok(match command {
        "START_TIME" => Piece::StartTime,
        "DURATION" => Piece::Duration,
        "RESPONSE_DURATION" => Piece::ResponseDuration,
        "RESPONSE_CODE" => Piece::ResponseCode,
        "RESPONSE_CODE_DETAILS" => Piece::ResponseCodeDetails,
        "RESPONSE_FLAGS" => Piece::ResponseFlags,
        "BYTES_RECEIVED" => Piece::BytesReceived,
        "BYTES_SENT" => Piece::BytesSent,
        "PROTOCOL" => Piece::Protocol,
        "UPSTREAM_HOST" => Piece::UpstreamHost,
        "UPSTREAM_CLUSTER" => Piece::UpstreamCluster,
        "ROUTE_NAME" => Piece::RouteName,
        "DOWNSTREAM_REMOTE_ADDRESS" => Piece::DownstreamRemoteAddress,
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Piece::DownstreamRemoteAddressWithoutPort,
        "DOWNSTREAM_LOCAL_ADDRESS" => Piece::DownstreamLocalAddress,
        "REQUESTED_SERVER_NAME" => Piece::RequestedServerName,
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => Piece::UpstreamTransportFailureReason,
        "HOSTNAME" => Piece::Hostname,
        other => return Err(format!("unknown access log command `%{other}%`")),
    })
}

impl Format {
    /// Compile a text format.
    pub fn text(fmt: &str) -> Result<Format, String> {
        Ok(Format(FormatKind::Text(parse_pieces(fmt)?)))
    }

    /// Compile a JSON format from field name → format string.
    pub fn json<'a>(
        fields: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Format, String> {
        let mut out = Vec::new();
        for (name, fmt) in fields {
            out.push((name.to_string(), parse_pieces(fmt)?));
        }
        Ok(Format(FormatKind::Json(out)))
    }

    /// Request headers the format reads (so the request path keeps only those).
    pub fn request_headers(&self) -> Vec<HeaderName> {
        let mut names = Vec::new();
        let mut add = |k: &HeaderKey| {
            if let HeaderKey::Name(n) = k
                && !names.contains(n)
            {
                names.push(n.clone());
            }
        };
        for p in self.pieces() {
            if let Piece::Req(a, b, _) = p {
                add(a);
                if let Some(b) = b {
                    add(b);
                }
            }
        }
        names
    }

    fn pieces(&self) -> Box<dyn Iterator<Item = &Piece> + '_> {
        match &self.0 {
            FormatKind::Text(p) => Box::new(p.iter()),
            FormatKind::Json(f) => Box::new(f.iter().flat_map(|(_, p)| p.iter())),
        }
    }
}

/// What one access-log line is made from. For a TCP connection the request fields are empty
/// (logged as `-`), `code` is 0, `protocol` is `-` and the byte counts are the connection's.
pub struct Entry<'a> {
    /// When the request started.
    pub start: SystemTime,
    /// Total duration.
    pub duration: Duration,
    /// Time to the first response byte, if any.
    pub response_duration: Option<Duration>,
    /// Method.
    pub method: &'a str,
    /// Path and query, as received.
    pub path: &'a str,
    /// Authority.
    pub authority: &'a str,
    /// Scheme.
    pub scheme: &'a str,
    /// Request headers the format needs.
    pub request_headers: &'a HeaderMap,
    /// Response headers.
    pub response_headers: Option<&'a HeaderMap>,
    /// Status code (0 when none was sent).
    pub code: u16,
    /// Why this code (Envoy's response code details).
    pub code_details: &'a str,
    /// Envoy response flags (`NR`, `UF`, `UO`, `URX`, `UT`, `RL`, `DC`, ...) or `-`.
    pub flags: &'a str,
    /// Request body bytes.
    pub bytes_received: u64,
    /// Response body bytes.
    pub bytes_sent: u64,
    /// `HTTP/1.1`, `HTTP/2`.
    pub protocol: &'a str,
    /// Upstream endpoint.
    pub upstream_host: Option<SocketAddr>,
    /// Upstream cluster.
    pub upstream_cluster: Option<&'a str>,
    /// Route name.
    pub route: Option<&'a str>,
    /// Client address.
    pub downstream_remote: SocketAddr,
    /// Listener address.
    pub downstream_local: SocketAddr,
    /// TLS SNI.
    pub sni: Option<&'a str>,
    /// Upstream failure reason.
    pub upstream_failure: Option<&'a str>,
}

fn header_value<'a>(
    entry: &'a Entry<'_>,
    key: &HeaderKey,
    response: bool,
) -> Option<std::borrow::Cow<'a, str>> {
    use std::borrow::Cow;
    // Empty for a TCP connection (no request): logged as `-`, as Envoy does.
    let text = |s: &'a str| (!s.is_empty()).then_some(Cow::Borrowed(s));
    match key {
        HeaderKey::Method if !response => text(entry.method),
        HeaderKey::Path if !response => text(entry.path),
        HeaderKey::Authority if !response => text(entry.authority),
        HeaderKey::Scheme if !response => text(entry.scheme),
        HeaderKey::Status if response && entry.code != 0 => {
            Some(Cow::Owned(entry.code.to_string()))
        }
        HeaderKey::Name(n) => {
            let map = if response {
                entry.response_headers?
            } else {
                entry.request_headers
            };
            map.get(n).map(|v| String::from_utf8_lossy(v.as_bytes()))
        }
        _ => None,
    }
}

fn render_piece(out: &mut String, piece: &Piece, e: &Entry<'_>) {
    let dash = |out: &mut String, v: Option<&dyn std::fmt::Display>| match v {
        Some(v) => {
            let _ = write!(out, "{v}");
        }
        None => out.push('-'),
    };
    match piece {
        Piece::Text(t) => out.push_str(t),
        Piece::Req(a, b, max) | Piece::Resp(a, b, max) => {
            let resp = matches!(piece, Piece::Resp(..));
            let v = header_value(e, a, resp)
                .or_else(|| b.as_ref().and_then(|b| header_value(e, b, resp)));
            match v {
                Some(v) => {
                    let v: &str = &v;
                    let cut = max.map_or(v.len(), |m| floor_char_boundary(v, m));
                    out.push_str(&v[..cut]);
                }
                None => out.push('-'),
            }
        }
        Piece::StartTime => {
            out.push_str(&humantime::format_rfc3339_millis(e.start).to_string());
        }
        Piece::Duration => {
            let _ = write!(out, "{}", e.duration.as_millis());
        }
        Piece::ResponseDuration => dash(
            out,
            e.response_duration
                .map(|d| d.as_millis())
                .as_ref()
                .map(|v| v as _),
        ),
        Piece::ResponseCode => {
            let _ = write!(out, "{}", e.code);
        }
        Piece::ResponseCodeDetails => out.push_str(if e.code_details.is_empty() {
            "-"
        } else {
            e.code_details
        }),
        Piece::ResponseFlags => out.push_str(if e.flags.is_empty() { "-" } else { e.flags }),
        Piece::BytesReceived => {
            let _ = write!(out, "{}", e.bytes_received);
        }
        Piece::BytesSent => {
            let _ = write!(out, "{}", e.bytes_sent);
        }
        Piece::Protocol => out.push_str(e.protocol),
        Piece::UpstreamHost => dash(out, e.upstream_host.as_ref().map(|v| v as _)),
        Piece::UpstreamCluster => out.push_str(e.upstream_cluster.unwrap_or("-")),
        Piece::RouteName => out.push_str(e.route.unwrap_or("-")),
        Piece::DownstreamRemoteAddress => {
            let _ = write!(out, "{}", e.downstream_remote);
        }
        Piece::DownstreamRemoteAddressWithoutPort => {
            let _ = write!(out, "{}", e.downstream_remote.ip());
        }
        Piece::DownstreamLocalAddress => {
            let _ = write!(out, "{}", e.downstream_local);
        }
        Piece::RequestedServerName => out.push_str(e.sni.unwrap_or("-")),
        Piece::UpstreamTransportFailureReason => out.push_str(e.upstream_failure.unwrap_or("-")),
        Piece::Hostname => out.push_str(hostname()),
    }
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    let mut i = max.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn hostname() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "-".into())
    })
}

impl Format {
    /// Render one line (with its trailing newline).
    pub fn render(&self, e: &Entry<'_>) -> String {
        let mut out = String::with_capacity(256);
        match &self.0 {
            FormatKind::Text(pieces) => {
                for p in pieces {
                    render_piece(&mut out, p, e);
                }
            }
            FormatKind::Json(fields) => {
                let mut map = serde_json::Map::new();
                let mut buf = String::new();
                for (name, pieces) in fields {
                    buf.clear();
                    for p in pieces {
                        render_piece(&mut buf, p, e);
                    }
                    // Single numeric commands are written as JSON numbers, as Envoy does.
                    let value = match pieces.as_slice() {
                        [
                            Piece::ResponseCode
                            | Piece::Duration
                            | Piece::BytesReceived
                            | Piece::BytesSent,
                        ] => buf
                            .parse::<u64>()
                            .map(serde_json::Value::from)
                            .unwrap_or_else(|_| buf.clone().into()),
                        [_] if buf == "-" => serde_json::Value::Null,
                        _ => buf.clone().into(),
                    };
                    map.insert(name.clone(), value);
                }
                out = serde_json::Value::Object(map).to_string();
            }
        }
        if !out.ends_with('\n') {
            out.push('\n');
        }
        out
    }
}

/// An access log: a format and a writer thread.
pub struct AccessLog {
    /// The compiled format.
    pub format: Format,
    /// Request headers to keep for the log.
    pub request_headers: Vec<HeaderName>,
    sender: SyncSender<String>,
    registry: Arc<Registry>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog").finish_non_exhaustive()
    }
}

impl AccessLog {
    /// Start a writer to `path` (`stdout` or a file, appended). The thread ends once every
    /// `AccessLog` handle is dropped and the queue is drained.
    pub fn start(
        format: Format,
        path: &str,
        buffer_lines: usize,
        registry: Arc<Registry>,
    ) -> Result<AccessLog, String> {
        let mut writer: Box<dyn Write + Send> = if path == "stdout" || path == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("cannot open access log `{path}`: {e}"))?,
            )
        };
        let (sender, receiver) = sync_channel::<String>(buffer_lines.max(1));
        std::thread::Builder::new()
            .name("weir-access-log".into())
            .spawn(move || {
                let mut buf = std::io::BufWriter::with_capacity(64 * 1024, &mut writer);
                while let Ok(line) = receiver.recv() {
                    let _ = buf.write_all(line.as_bytes());
                    while let Ok(line) = receiver.try_recv() {
                        let _ = buf.write_all(line.as_bytes());
                    }
                    let _ = buf.flush();
                }
            })
            .map_err(|e| format!("cannot start access log thread: {e}"))?;
        Ok(AccessLog {
            request_headers: format.request_headers(),
            format,
            sender,
            registry,
        })
    }

    /// Queue one entry; never blocks.
    pub fn log(&self, entry: &Entry<'_>) {
        let line = self.format.render(entry);
        match self.sender.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.registry
                    .global
                    .access_log_dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>(h: &'a HeaderMap, rh: &'a HeaderMap) -> Entry<'a> {
        Entry {
            start: SystemTime::UNIX_EPOCH,
            duration: Duration::from_millis(12),
            response_duration: None,
            method: "GET",
            path: "/a?b=1",
            authority: "example.com",
            scheme: "http",
            request_headers: h,
            response_headers: Some(rh),
            code: 404,
            code_details: "route_not_found",
            flags: "NR",
            bytes_received: 0,
            bytes_sent: 9,
            protocol: "HTTP/1.1",
            upstream_host: None,
            upstream_cluster: None,
            route: None,
            downstream_remote: "10.0.0.1:5555".parse().unwrap(),
            downstream_local: "127.0.0.1:80".parse().unwrap(),
            sni: None,
            upstream_failure: None,
        }
    }

    #[test]
    fn envoy_default_format() {
        let f = Format::text(DEFAULT_FORMAT).unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-request-id", "abc".parse().unwrap());
        h.insert("user-agent", "curl/8".parse().unwrap());
        let rh = HeaderMap::new();
        let line = f.render(&entry(&h, &rh));
        assert_eq!(
            line,
            "[1970-01-01T00:00:00.000Z] \"GET /a?b=1 HTTP/1.1\" 404 NR 0 9 12 - \"-\" \"curl/8\" \"abc\" \"example.com\" \"-\"\n"
        );
        assert_eq!(f.request_headers().len(), 4);
    }

    #[test]
    fn json_and_truncation() {
        let f = Format::json([
            ("code", "%RESPONSE_CODE%"),
            ("m", "%REQ(:METHOD)%"),
            ("ua", "%REQ(USER-AGENT):3%"),
            ("up", "%UPSTREAM_HOST%"),
        ])
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert("user-agent", "curl/8".parse().unwrap());
        let rh = HeaderMap::new();
        let v: serde_json::Value = serde_json::from_str(&f.render(&entry(&h, &rh))).unwrap();
        assert_eq!(v["code"], 404);
        assert_eq!(v["m"], "GET");
        assert_eq!(v["ua"], "cur");
        assert!(v["up"].is_null());
    }

    #[test]
    fn bad_formats() {
        assert!(Format::text("%NOPE%").is_err());
        assert!(Format::text("%REQ(x").is_err());
        assert!(Format::text("100%% %DURATION").is_err());
        assert_eq!(
            Format::text("100%%")
                .unwrap()
                .render(&entry(&HeaderMap::new(), &HeaderMap::new())),
            "100%\n"
        );
    }

    #[test]
    fn a_stalled_writer_drops_and_counts_lines_without_blocking() {
        // A FIFO whose reader never reads: the writer thread blocks once the pipe is full, the
        // queue fills, and `log` must drop and count instead of waiting.
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("log.fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let reader_path = fifo.clone();
        let reader = std::thread::spawn(move || std::fs::File::open(reader_path).unwrap());
        let registry = Arc::new(Registry::default());
        let log = AccessLog::start(
            Format::text("%REQ(:PATH)% %RESPONSE_CODE%").unwrap(),
            fifo.to_str().unwrap(),
            16,
            registry.clone(),
        )
        .unwrap();
        let _held_open = reader.join().unwrap();
        let h = HeaderMap::new();
        let rh = HeaderMap::new();
        let path = "/".repeat(1000);
        let mut e = entry(&h, &rh);
        e.path = &path;
        for _ in 0..2000 {
            log.log(&e);
        }
        let dropped = registry
            .global
            .access_log_dropped
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            dropped > 0,
            "2 MB into a 64 KiB pipe and a 16-line queue must drop"
        );
        assert!(dropped < 2000, "some lines were written");
    }
}
