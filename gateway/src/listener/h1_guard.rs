//! Strict HTTP/1 framing in front of hyper, against request smuggling.
//!
//! hyper 1 (through httparse) is more lenient than Envoy and nginx: it accepts `Content-Length`
//! together with `Transfer-Encoding`, `Transfer-Encoding: gzip, chunked`, a repeated identical
//! `Content-Length`, bare-LF line endings and any bytes in chunk extensions. When two HTTP
//! implementations on a request's path disagree about where a message ends, an attacker can hide
//! a second request inside the first one. Weir must answer such input the way Envoy does: `400`,
//! then close the connection.
//!
//! [`H1Guard`] wraps the downstream stream (TCP or TLS) and frames the incoming bytes itself,
//! message by message: the request head up to its blank line, then the body by its framing (none,
//! `Content-Length`, or chunked with its trailers), then the next head (keep-alive, pipelining).
//! Bytes reach hyper unchanged and in order. The guard scans them in the buffer hyper gave it;
//! only the parts that must be checked whole before hyper may see them (a request head, a chunk
//! size line, a trailer section) are held back when they arrive split over several reads, and
//! never more than the head limit ([`DEFAULT_MAX_HEAD_BYTES`]).
//!
//! On a violation the guard gives hyper the bytes before the offending head and then EOF, so
//! hyper finishes the requests it already has and shuts the connection down; the guard then writes
//! a canned `400` ([`BAD_REQUEST`]) before the shutdown, and records the [`Violation`] in the
//! connection's [`GuardStats`]. If hyper drops the connection without a shutdown, nothing is
//! written. A violation inside a chunked body (the request is already with hyper and the service)
//! is recorded and ends the read side, but no canned response is written: that request's response
//! belongs to the service.
//!
//! Pipelining: with hyper's default `half_close(false)`, hyper reads while a request is in flight
//! to notice a client that went away, and takes the guard's EOF for that: it drops the in-flight
//! request and closes without a response or the 400. With `half_close(true)` hyper does not read
//! while busy, answers the earlier requests, and then sees the EOF and shuts down (400 written).
//! The end is the same either way: the offending request never reaches hyper.
//!
//! The guard stops looking at the connection's bytes (pass-through) after the HTTP/2
//! prior-knowledge preface, and after a request head that asks to switch protocols (`Upgrade:`
//! header, `CONNECT` method).
//!
//! ```ignore
//! let stats = Arc::new(GuardStats::default());
//! let io = TokioIo::new(H1Guard::new(stream, stats.clone()).max_head_bytes(limit));
//! let result = builder.serve_connection_with_upgrades(io, service).await;
//! if let Some(violation) = stats.violation() {
//!     // count `downstream_protocol_errors`, log `violation.reason()`
//! }
//! ```

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Default limit on a request head (request line, headers, final blank line) and on a trailer
/// section, in bytes: 60 KiB, Envoy's default `max_request_headers_kb`.
pub const DEFAULT_MAX_HEAD_BYTES: usize = 60 * 1024;

/// The response written before shutdown after a violation in a request head.
pub const BAD_REQUEST: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 11\r\n\
content-type: text/plain\r\nconnection: close\r\n\r\nBad Request";

/// The response written before shutdown when a request head is longer than the limit.
pub const HEADERS_TOO_LARGE: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\n\
content-length: 31\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n\
Request Header Fields Too Large";

/// Longest chunk size line (size and extensions), in bytes.
const MAX_CHUNK_LINE_BYTES: usize = 4096;
/// Longest `Content-Length` or `Transfer-Encoding` value, in bytes.
const MAX_VALUE_BYTES: usize = 64;
/// Most hex digits in a chunk size: 16 fill a `u64`, so sizes cannot overflow.
const MAX_CHUNK_SIZE_DIGITS: u8 = 16;
/// How much to read at once while a split head is being held back.
const HOLD_READ_BYTES: usize = 8 * 1024;

/// Request-line prefixes to recognize, matched case-sensitively (methods are).
const REQUEST_LINES: [&[u8]; 2] = [b"CONNECT ", b"PRI * HTTP/2.0"];
const CONNECT: u8 = 1 << 0;
const PREFACE: u8 = 1 << 1;

/// Header names to recognize, lowercase, in [`Field`] order.
const FIELD_NAMES: [&[u8]; 3] = [b"content-length", b"transfer-encoding", b"upgrade"];
const ALL: u8 = 0b111;

/// A framing rule the downstream bytes broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Violation {
    /// A line ended with LF alone, not CRLF.
    BareLf,
    /// A CR not followed by LF.
    BareCr,
    /// A header or trailer line starts with whitespace (obsolete line folding).
    ObsFold,
    /// More than one `Content-Length` header line, even with the same value.
    DuplicateContentLength,
    /// A `Content-Length` value that is not a single decimal number.
    InvalidContentLength,
    /// Both `Content-Length` and `Transfer-Encoding`.
    ContentLengthWithTransferEncoding,
    /// More than one `Transfer-Encoding` header line.
    DuplicateTransferEncoding,
    /// A `Transfer-Encoding` other than exactly `chunked`.
    UnsupportedTransferEncoding,
    /// A request head longer than the limit.
    HeadTooLarge,
    /// A chunk size that is not 1 to 16 hex digits.
    InvalidChunkSize,
    /// A chunk extension that is not `;name[=value]` with token or quoted-string values.
    InvalidChunkExtension,
    /// A chunk size line longer than 4 KiB.
    ChunkLineTooLong,
    /// Chunk data not followed by CRLF.
    MissingChunkCrlf,
    /// A trailer section longer than the head limit.
    TrailersTooLarge,
}

impl Violation {
    /// A short fixed description, for logs and metric labels.
    pub fn reason(self) -> &'static str {
        match self {
            Violation::BareLf => "bare LF line ending",
            Violation::BareCr => "bare CR",
            Violation::ObsFold => "obsolete line folding",
            Violation::DuplicateContentLength => "duplicate content-length",
            Violation::InvalidContentLength => "invalid content-length",
            Violation::ContentLengthWithTransferEncoding => "content-length with transfer-encoding",
            Violation::DuplicateTransferEncoding => "duplicate transfer-encoding",
            Violation::UnsupportedTransferEncoding => "transfer-encoding other than chunked",
            Violation::HeadTooLarge => "request head too large",
            Violation::InvalidChunkSize => "invalid chunk size",
            Violation::InvalidChunkExtension => "invalid chunk extension",
            Violation::ChunkLineTooLong => "chunk line too long",
            Violation::MissingChunkCrlf => "chunk data not followed by CRLF",
            Violation::TrailersTooLarge => "trailers too large",
        }
    }

    /// The canned response for this violation when it is found in a request head:
    /// [`HEADERS_TOO_LARGE`] for [`Violation::HeadTooLarge`], [`BAD_REQUEST`] otherwise.
    pub fn response(self) -> &'static [u8] {
        match self {
            Violation::HeadTooLarge => HEADERS_TOO_LARGE,
            _ => BAD_REQUEST,
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

/// What the guard found on one connection, shared with the code that serves it.
///
/// Create one per connection, give a clone of the `Arc` to [`H1Guard::new`] and read it when the
/// connection ends (or at any time) to count `downstream_protocol_errors` and log the reason.
#[derive(Debug, Default)]
pub struct GuardStats {
    violation: OnceLock<Violation>,
}

impl GuardStats {
    /// The violation that ended the connection's HTTP/1 reads, if any. A connection has at most
    /// one: the guard stops reading at the first.
    pub fn violation(&self) -> Option<Violation> {
        self.violation.get().copied()
    }

    /// The violation's [`Violation::reason`], if any.
    pub fn reason(&self) -> Option<&'static str> {
        self.violation().map(Violation::reason)
    }

    /// Whether the connection broke a framing rule.
    pub fn is_violation(&self) -> bool {
        self.violation.get().is_some()
    }

    fn record(&self, violation: Violation) {
        // The guard stops at its first violation, so this is the only `set`.
        let _ = self.violation.set(violation);
    }
}

/// An I/O wrapper that enforces strict HTTP/1 request framing before hyper sees the bytes.
///
/// Reads pass the downstream bytes through unchanged until a violation; from then on they return
/// EOF. Writes pass straight through. `poll_shutdown` writes the canned response first when the
/// violation was in a request head. See the [module docs](self).
#[derive(Debug)]
pub struct H1Guard<T> {
    io: T,
    scanner: Scanner,
    /// Bytes read from `io` that the reader has not been given: `held[..ready]` are checked and
    /// wait for room in the reader's buffer; `held[ready..]` begin a head, chunk line or trailer
    /// section that has not been completed yet.
    held: Vec<u8>,
    ready: usize,
    stats: Arc<GuardStats>,
    /// The canned response still to write on shutdown, and how much of it is written.
    reply: Option<&'static [u8]>,
    reply_written: usize,
}

impl<T> H1Guard<T> {
    /// Guard `io`, recording a violation in `stats`. The head limit is
    /// [`DEFAULT_MAX_HEAD_BYTES`].
    pub fn new(io: T, stats: Arc<GuardStats>) -> H1Guard<T> {
        H1Guard {
            io,
            scanner: Scanner::new(DEFAULT_MAX_HEAD_BYTES),
            held: Vec::new(),
            ready: 0,
            stats,
            reply: None,
            reply_written: 0,
        }
    }

    /// Set the limit on a request head and on a trailer section, in bytes. A longer head is a
    /// [`Violation::HeadTooLarge`], answered with [`HEADERS_TOO_LARGE`]. Use the limit given to
    /// hyper (`max_buf_size`) so both agree.
    pub fn max_head_bytes(mut self, limit: usize) -> H1Guard<T> {
        self.scanner.max_head = limit;
        self
    }

    /// The violation found on this connection, if any.
    pub fn violation(&self) -> Option<Violation> {
        self.stats.violation()
    }

    /// The wrapped stream (for its addresses or TLS session).
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    fn reject(&mut self, found: Found) {
        self.stats.record(found.violation);
        if found.in_head {
            self.reply = Some(found.violation.response());
        }
    }

    /// Give the reader as many checked held bytes as fit.
    fn deliver(&mut self, buf: &mut ReadBuf<'_>) {
        let n = self.ready.min(buf.remaining());
        buf.put_slice(&self.held[..n]);
        self.held.drain(..n);
        self.ready -= n;
        if self.held.is_empty() {
            // Split heads are rare; do not keep their memory on idle connections.
            self.held = Vec::new();
        }
    }
}

impl<T: AsyncRead + Unpin> H1Guard<T> {
    /// Read into the reader's buffer and scan the new bytes there. Bytes of an unfinished head at
    /// the end move to `held`. Returns whether the reader got bytes or EOF.
    fn poll_read_in_place(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<bool>> {
        let start = buf.filled().len();
        ready!(Pin::new(&mut self.io).poll_read(cx, buf))?;
        let read = &buf.filled()[start..];
        if read.is_empty() {
            return Poll::Ready(Ok(true));
        }
        let scan = self.scanner.scan(read);
        // Nothing is held, so the scanner was not inside a head when this read began.
        let safe = start + scan.safe.unwrap_or(0);
        match scan.found {
            Some(found) => self.reject(found),
            None => self.held.extend_from_slice(&buf.filled()[safe..]),
        }
        buf.set_filled(safe);
        Poll::Ready(Ok(safe > start))
    }

    /// Read more of a held, unfinished head into `held` and scan it there.
    fn poll_read_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let old = self.held.len();
        self.held.resize(old + HOLD_READ_BYTES, 0);
        let mut into = ReadBuf::new(&mut self.held[old..]);
        let result = Pin::new(&mut self.io).poll_read(cx, &mut into);
        let n = into.filled().len();
        self.held.truncate(old + n);
        ready!(result)?;
        if n == 0 {
            // EOF inside a head: hyper gets the incomplete head and EOF, which it cannot mistake
            // for a request.
            self.ready = self.held.len();
            return Poll::Ready(Ok(()));
        }
        let scan = self.scanner.scan(&self.held[old..]);
        if let Some(safe) = scan.safe {
            self.ready = old + safe;
        }
        if let Some(found) = scan.found {
            self.held.truncate(self.ready);
            self.reject(found);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for H1Guard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.ready > 0 {
                this.deliver(buf);
                return Poll::Ready(Ok(()));
            }
            if this.scanner.failed() {
                return Poll::Ready(Ok(()));
            }
            if !this.held.is_empty() {
                ready!(this.poll_read_held(cx))?;
                continue;
            }
            if this.scanner.passing_through() {
                return Pin::new(&mut this.io).poll_read(cx, buf);
            }
            if ready!(this.poll_read_in_place(cx, buf))? {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for H1Guard<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(reply) = this.reply {
            while this.reply_written < reply.len() {
                let n =
                    ready!(Pin::new(&mut this.io).poll_write(cx, &reply[this.reply_written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                this.reply_written += n;
            }
            ready!(Pin::new(&mut this.io).poll_flush(cx))?;
            this.reply = None;
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// The result of scanning one slice.
#[derive(Debug)]
struct Scan {
    /// The bytes before this offset may go to hyper, and so may every byte before the slice.
    /// `None`: the slice continues a head that began before it and is still unfinished (or that
    /// head broke a rule), so nothing from the head's start on may go.
    safe: Option<usize>,
    /// The violation that stopped scanning.
    found: Option<Found>,
}

/// A violation and where it was found.
#[derive(Debug, Clone, Copy)]
struct Found {
    violation: Violation,
    /// In a request head (no request of it reached hyper): answer with the canned response.
    in_head: bool,
}

/// The framing state of the downstream byte stream.
#[derive(Debug)]
struct Scanner {
    phase: Phase,
    /// No request head has ended yet: the HTTP/2 preface can only come first.
    first: bool,
    max_head: usize,
}

#[derive(Debug)]
enum Phase {
    /// A request head, or the gap before one.
    Head(Head),
    /// A `Content-Length` body: bytes left.
    Body(u64),
    /// A chunk size line.
    ChunkLine(ChunkLine),
    /// Chunk data: bytes left.
    ChunkData(u64),
    /// The CR after chunk data.
    ChunkCr,
    /// The LF after chunk data.
    ChunkLf,
    /// The trailer section after the last chunk, up to its blank line.
    Trailers(Trailers),
    /// Not HTTP/1 any more (h2 preface, upgrade, CONNECT): bytes pass unchecked.
    PassThrough,
    /// A rule was broken; nothing more passes.
    Failed,
}

impl Scanner {
    fn new(max_head: usize) -> Scanner {
        Scanner {
            phase: Phase::Head(Head::new()),
            first: true,
            max_head,
        }
    }

    fn failed(&self) -> bool {
        matches!(self.phase, Phase::Failed)
    }

    fn passing_through(&self) -> bool {
        matches!(self.phase, Phase::PassThrough)
    }

    /// Inside a part that must be checked whole before hyper sees any of it.
    fn holding(&self) -> bool {
        match &self.phase {
            Phase::Head(head) => head.len > 0,
            Phase::ChunkLine(line) => line.len > 0,
            Phase::Trailers(trailers) => trailers.len > 0,
            _ => false,
        }
    }

    fn scan(&mut self, bytes: &[u8]) -> Scan {
        let mut safe = (!self.holding()).then_some(0);
        let mut i = 0;
        while i < bytes.len() {
            let step = match self.phase {
                Phase::Body(left) | Phase::ChunkData(left) => {
                    let n = usize::try_from(left)
                        .map_or(bytes.len() - i, |left| left.min(bytes.len() - i));
                    i += n;
                    self.skipped(n);
                    Ok(())
                }
                Phase::PassThrough => {
                    i = bytes.len();
                    Ok(())
                }
                Phase::Failed => break,
                Phase::Head(ref mut head) => {
                    // Bytes of a value (or request line) that decide nothing go up to the line's
                    // end at once; the others one by one.
                    match head.skippable(&bytes[i..], self.max_head) {
                        0 => {
                            let step = self.step(bytes[i]);
                            i += 1;
                            step
                        }
                        n => {
                            head.skip(n);
                            i += n;
                            Ok(())
                        }
                    }
                }
                _ => {
                    let step = self.step(bytes[i]);
                    i += 1;
                    step
                }
            };
            if let Err(found) = step {
                self.phase = Phase::Failed;
                return Scan {
                    safe,
                    found: Some(found),
                };
            }
            if !self.holding() {
                safe = Some(i);
            }
        }
        Scan { safe, found: None }
    }

    /// `n` body bytes went by.
    fn skipped(&mut self, n: usize) {
        let n = n as u64;
        match &mut self.phase {
            Phase::Body(left) => {
                *left -= n;
                if *left == 0 {
                    self.phase = Phase::Head(Head::new());
                }
            }
            Phase::ChunkData(left) => {
                *left -= n;
                if *left == 0 {
                    self.phase = Phase::ChunkCr;
                }
            }
            _ => {}
        }
    }

    /// One byte of a head, chunk line, chunk CRLF or trailer section.
    fn step(&mut self, b: u8) -> Result<(), Found> {
        let max_head = self.max_head;
        let in_head = |violation| Found {
            violation,
            in_head: true,
        };
        let in_body = |violation| Found {
            violation,
            in_head: false,
        };
        let next = match &mut self.phase {
            Phase::Head(head) => match head.feed(b, max_head).map_err(in_head)? {
                false => return Ok(()),
                true => {
                    let first = std::mem::replace(&mut self.first, false);
                    head.next_phase(first)
                }
            },
            Phase::ChunkLine(line) => match line.feed(b).map_err(in_body)? {
                None => return Ok(()),
                Some(0) => Phase::Trailers(Trailers::default()),
                Some(size) => Phase::ChunkData(size),
            },
            Phase::ChunkCr if b == b'\r' => Phase::ChunkLf,
            Phase::ChunkLf if b == b'\n' => Phase::ChunkLine(ChunkLine::default()),
            Phase::ChunkCr | Phase::ChunkLf => {
                return Err(in_body(Violation::MissingChunkCrlf));
            }
            Phase::Trailers(trailers) => match trailers.feed(b, max_head).map_err(in_body)? {
                false => return Ok(()),
                true => Phase::Head(Head::new()),
            },
            Phase::Body(_) | Phase::ChunkData(_) | Phase::PassThrough | Phase::Failed => {
                return Ok(());
            }
        };
        self.phase = next;
        Ok(())
    }
}

/// CRLF line endings: a CR must come right before an LF, and an LF right after a CR.
#[derive(Debug, Default)]
struct Crlf {
    cr: bool,
}

/// A byte seen through [`Crlf`].
enum LineByte {
    /// Part of the line.
    Byte(u8),
    /// The CR of a line ending.
    Cr,
    /// The LF of a line ending: the line is complete.
    End,
}

impl Crlf {
    fn feed(&mut self, b: u8) -> Result<LineByte, Violation> {
        if std::mem::take(&mut self.cr) {
            return match b {
                b'\n' => Ok(LineByte::End),
                _ => Err(Violation::BareCr),
            };
        }
        match b {
            b'\r' => {
                self.cr = true;
                Ok(LineByte::Cr)
            }
            b'\n' => Err(Violation::BareLf),
            _ => Ok(LineByte::Byte(b)),
        }
    }
}

/// The header fields that decide framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    ContentLength,
    TransferEncoding,
    Upgrade,
}

const FIELDS: [Field; 3] = [
    Field::ContentLength,
    Field::TransferEncoding,
    Field::Upgrade,
];

/// Where a header line is.
#[derive(Debug, Clone, Copy)]
enum Part {
    /// Before the colon.
    Name,
    /// After the colon: the field the name is, if one that matters.
    Value(Option<Field>),
}

/// A request head being scanned: a few flags and the current line, never the whole head.
#[derive(Debug)]
struct Head {
    /// Bytes of the head so far.
    len: usize,
    /// Complete lines so far (the request line is line 0).
    lines: usize,
    crlf: Crlf,
    line: Line,
    content_length: Option<u64>,
    chunked: bool,
    upgrade: bool,
    connect: bool,
    preface: bool,
}

/// The current line of a head: how far it matches the names that matter, and the value of a
/// `Content-Length` or `Transfer-Encoding` line.
#[derive(Debug)]
struct Line {
    len: usize,
    /// Bits of [`REQUEST_LINES`] (request line) or [`FIELD_NAMES`] (header line) that the line
    /// still matches.
    matches: u8,
    part: Part,
    value: [u8; MAX_VALUE_BYTES],
    value_len: usize,
}

impl Line {
    fn new() -> Line {
        Line {
            len: 0,
            matches: ALL,
            part: Part::Name,
            value: [0; MAX_VALUE_BYTES],
            value_len: 0,
        }
    }

    /// The value with its surrounding whitespace removed (leading whitespace is never stored).
    fn value(&self) -> &[u8] {
        let value = &self.value[..self.value_len];
        let end = value
            .iter()
            .rposition(|&b| !is_ws(b))
            .map_or(0, |last| last + 1);
        &value[..end]
    }
}

impl Head {
    fn new() -> Head {
        Head {
            len: 0,
            lines: 0,
            crlf: Crlf::default(),
            line: Line::new(),
            content_length: None,
            chunked: false,
            upgrade: false,
            connect: false,
            preface: false,
        }
    }

    /// How many of the bytes at the start of `rest` are plain bytes of the current line that
    /// `feed` would only count: the rest of a request line no special form matches any more,
    /// of a field name that can no longer be a framing field (up to its `:`), or of a value
    /// that does not decide framing. Stops before a CR or LF, and before `max_head` (so `feed`
    /// reports that).
    fn skippable(&self, rest: &[u8], max_head: usize) -> usize {
        let line = &self.line;
        let plain = match line.part {
            Part::Name => line.matches == 0,
            Part::Value(field) => field.is_none() || field == Some(Field::Upgrade),
        };
        // A header line's first byte is checked for obs-fold.
        if !plain || self.crlf.cr || (self.lines > 0 && line.len == 0) {
            return 0;
        }
        let stop_at_colon = self.lines > 0 && matches!(line.part, Part::Name);
        let room = max_head.saturating_sub(self.len);
        let rest = &rest[..rest.len().min(room)];
        rest.iter()
            .position(|&b| b == b'\r' || b == b'\n' || (stop_at_colon && b == b':'))
            .unwrap_or(rest.len())
    }

    /// Count `n` bytes found [`skippable`](Self::skippable).
    fn skip(&mut self, n: usize) {
        self.len += n;
        self.line.len += n;
    }

    /// One byte; `true` when it ends the head.
    fn feed(&mut self, b: u8, max_head: usize) -> Result<bool, Violation> {
        self.len += 1;
        if self.len > max_head {
            return Err(Violation::HeadTooLarge);
        }
        match self.crlf.feed(b)? {
            LineByte::Byte(b) => self.line_byte(b).map(|()| false),
            LineByte::Cr => Ok(false),
            LineByte::End => self.end_line(),
        }
    }

    fn line_byte(&mut self, b: u8) -> Result<(), Violation> {
        let line = &mut self.line;
        let pos = line.len;
        line.len += 1;
        if self.lines == 0 {
            line.matches = still_matching(line.matches, &REQUEST_LINES, pos, b);
            return Ok(());
        }
        if pos == 0 && is_ws(b) {
            return Err(Violation::ObsFold);
        }
        match line.part {
            Part::Name if b == b':' => {
                // The names differ in length, so at most one matches whole.
                let whole = FIELD_NAMES.iter().position(|name| name.len() == pos);
                let field = whole.filter(|&bit| line.matches & (1 << bit) != 0);
                line.part = Part::Value(field.map(|bit| FIELDS[bit]));
            }
            Part::Name => {
                line.matches =
                    still_matching(line.matches, &FIELD_NAMES, pos, b.to_ascii_lowercase());
            }
            Part::Value(Some(field @ (Field::ContentLength | Field::TransferEncoding))) => {
                if line.value_len == 0 && is_ws(b) {
                    return Ok(());
                }
                if line.value_len == MAX_VALUE_BYTES {
                    return Err(match field {
                        Field::ContentLength => Violation::InvalidContentLength,
                        _ => Violation::UnsupportedTransferEncoding,
                    });
                }
                line.value[line.value_len] = b;
                line.value_len += 1;
            }
            Part::Value(_) => {}
        }
        Ok(())
    }

    /// A line ended; `true` when it was the blank line that ends the head.
    fn end_line(&mut self) -> Result<bool, Violation> {
        let line = std::mem::replace(&mut self.line, Line::new());
        if self.lines == 0 {
            if line.len == 0 {
                // An empty line before the request line is allowed (RFC 9112, section 2.2).
                self.len = 0;
                return Ok(false);
            }
            self.connect = line.matches & CONNECT != 0 && line.len > REQUEST_LINES[0].len();
            self.preface = line.matches & PREFACE != 0 && line.len == REQUEST_LINES[1].len();
            self.lines = 1;
            return Ok(false);
        }
        if line.len == 0 {
            return Ok(true);
        }
        self.lines += 1;
        match line.part {
            Part::Value(Some(Field::ContentLength)) => {
                if self.content_length.is_some() {
                    return Err(Violation::DuplicateContentLength);
                }
                if self.chunked {
                    return Err(Violation::ContentLengthWithTransferEncoding);
                }
                self.content_length = Some(parse_decimal(line.value())?);
            }
            Part::Value(Some(Field::TransferEncoding)) => {
                if self.chunked {
                    return Err(Violation::DuplicateTransferEncoding);
                }
                if self.content_length.is_some() {
                    return Err(Violation::ContentLengthWithTransferEncoding);
                }
                if !line.value().eq_ignore_ascii_case(b"chunked") {
                    return Err(Violation::UnsupportedTransferEncoding);
                }
                self.chunked = true;
            }
            Part::Value(Some(Field::Upgrade)) => self.upgrade = true,
            Part::Value(None) | Part::Name => {}
        }
        Ok(false)
    }

    /// What follows this complete head.
    fn next_phase(&self, first: bool) -> Phase {
        if (first && self.preface && self.lines == 1) || self.upgrade || self.connect {
            return Phase::PassThrough;
        }
        if self.chunked {
            return Phase::ChunkLine(ChunkLine::default());
        }
        match self.content_length {
            Some(len) if len > 0 => Phase::Body(len),
            _ => Phase::Head(Head::new()),
        }
    }
}

/// Where a chunk size line is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkPart {
    /// In the hex size.
    #[default]
    Size,
    /// Whitespace after the size, before a `;`.
    SizeWs,
    /// After `;`, before the extension name.
    BeforeName,
    Name,
    AfterName,
    /// After `=`, before the value.
    BeforeValue,
    Token,
    Quoted,
    QuotedEscape,
    /// After the closing quote.
    Closed,
    /// Whitespace after a value, before a `;`.
    AfterValue,
}

/// A chunk size line: `size *( BWS ";" BWS name [ BWS "=" BWS value ] ) CRLF`.
#[derive(Debug, Default)]
struct ChunkLine {
    len: usize,
    digits: u8,
    size: u64,
    part: ChunkPart,
    crlf: Crlf,
}

impl ChunkLine {
    /// One byte; the chunk size when the line is complete.
    fn feed(&mut self, b: u8) -> Result<Option<u64>, Violation> {
        self.len += 1;
        if self.len > MAX_CHUNK_LINE_BYTES {
            return Err(Violation::ChunkLineTooLong);
        }
        match self.crlf.feed(b)? {
            LineByte::End => Ok(Some(self.size)),
            LineByte::Cr => match self.part {
                ChunkPart::Size if self.digits == 0 => Err(Violation::InvalidChunkSize),
                ChunkPart::Size | ChunkPart::Name | ChunkPart::Token | ChunkPart::Closed => {
                    Ok(None)
                }
                _ => Err(Violation::InvalidChunkExtension),
            },
            LineByte::Byte(b) => self.byte(b).map(|()| None),
        }
    }

    fn byte(&mut self, b: u8) -> Result<(), Violation> {
        use ChunkPart::*;
        let ws = is_ws(b);
        self.part = match (self.part, b) {
            (Size, _) if b.is_ascii_hexdigit() => {
                self.digits += 1;
                if self.digits > MAX_CHUNK_SIZE_DIGITS {
                    return Err(Violation::InvalidChunkSize);
                }
                let digit = char::from(b).to_digit(16).unwrap_or_default();
                self.size = (self.size << 4) | u64::from(digit);
                Size
            }
            (Size, _) if self.digits == 0 => return Err(Violation::InvalidChunkSize),
            (Size | SizeWs, b';') => BeforeName,
            (Size | SizeWs, _) if ws => SizeWs,
            (Size, _) => return Err(Violation::InvalidChunkSize),
            (BeforeName | AfterName | BeforeValue | AfterValue, _) if ws => self.part,
            (BeforeName, _) | (Name, _) if is_tchar(b) => Name,
            (Name | AfterName | Token | Closed | AfterValue, b';') => BeforeName,
            (Name | AfterName, b'=') => BeforeValue,
            (Name, _) if ws => AfterName,
            (BeforeValue | Token, _) if is_tchar(b) => Token,
            (BeforeValue, b'"') => Quoted,
            (Token | Closed, _) if ws => AfterValue,
            (Quoted, b'"') => Closed,
            (Quoted, b'\\') => QuotedEscape,
            (Quoted, _) if is_qdtext(b) => Quoted,
            (QuotedEscape, _) if ws || b.is_ascii_graphic() || b >= 0x80 => Quoted,
            _ => return Err(Violation::InvalidChunkExtension),
        };
        Ok(())
    }
}

/// The trailer section: lines up to a blank line. Only line endings and size are checked here;
/// hyper parses the fields.
#[derive(Debug, Default)]
struct Trailers {
    len: usize,
    line_len: usize,
    crlf: Crlf,
}

impl Trailers {
    /// One byte; `true` when it ends the section.
    fn feed(&mut self, b: u8, max: usize) -> Result<bool, Violation> {
        self.len += 1;
        if self.len > max {
            return Err(Violation::TrailersTooLarge);
        }
        match self.crlf.feed(b)? {
            LineByte::End => Ok(std::mem::take(&mut self.line_len) == 0),
            LineByte::Cr => Ok(false),
            LineByte::Byte(b) if self.line_len == 0 && is_ws(b) => Err(Violation::ObsFold),
            LineByte::Byte(_) => {
                self.line_len += 1;
                Ok(false)
            }
        }
    }
}

/// Clear the bits of `literals` whose byte at `pos` is not `b`; bytes past a literal's end keep
/// its bit (the caller checks the length).
fn still_matching(mask: u8, literals: &[&[u8]], pos: usize, b: u8) -> u8 {
    literals
        .iter()
        .enumerate()
        .filter(|(_, literal)| literal.get(pos).is_some_and(|&want| want != b))
        .fold(mask, |mask, (bit, _)| mask & !(1 << bit))
}

/// A `Content-Length` value: one or more digits, no sign, no list, no overflow.
fn parse_decimal(value: &[u8]) -> Result<u64, Violation> {
    if value.is_empty() {
        return Err(Violation::InvalidContentLength);
    }
    value.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return Err(Violation::InvalidContentLength);
        }
        n.checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(b - b'0')))
            .ok_or(Violation::InvalidContentLength)
    })
}

fn is_ws(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// `tchar` of RFC 9110, section 5.6.2.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `qdtext` of RFC 9110, section 5.6.4.
fn is_qdtext(b: u8) -> bool {
    matches!(b, b'\t' | b' ' | 0x21 | 0x23..=0x5B | 0x5D..=0x7E | 0x80..=0xFF)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::future::poll_fn;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A scripted stream: each read returns (up to the buffer's room of) the next chunk, after a
    /// `Pending` every other time; writes are collected.
    #[derive(Debug, Default)]
    struct Script {
        chunks: VecDeque<Vec<u8>>,
        stall: bool,
        written: Vec<u8>,
        shut: bool,
    }

    impl AsyncRead for Script {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            this.stall = !this.stall;
            if this.stall {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if let Some(mut chunk) = this.chunks.pop_front() {
                let n = chunk.len().min(buf.remaining());
                buf.put_slice(&chunk[..n]);
                if n < chunk.len() {
                    this.chunks.push_front(chunk.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Script {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let before = this.written.len();
            bufs.iter()
                .for_each(|buf| this.written.extend_from_slice(buf));
            Poll::Ready(Ok(this.written.len() - before))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().shut = true;
            Poll::Ready(Ok(()))
        }
    }

    /// What a reader saw through the guard.
    #[derive(Debug, PartialEq, Eq)]
    struct Seen {
        read: Vec<u8>,
        violation: Option<Violation>,
        /// Written on shutdown.
        reply: Vec<u8>,
    }

    async fn run(chunks: Vec<Vec<u8>>, read_size: usize, max_head: usize) -> Seen {
        let stats = Arc::new(GuardStats::default());
        let script = Script {
            chunks: chunks.into(),
            ..Script::default()
        };
        let mut guard = H1Guard::new(script, stats.clone()).max_head_bytes(max_head);
        let mut read = Vec::new();
        let mut buf = vec![0; read_size];
        loop {
            let n = guard.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            read.extend_from_slice(&buf[..n]);
        }
        // Reads stay at EOF.
        assert_eq!(guard.read(&mut buf).await.expect("read"), 0);
        guard.shutdown().await.expect("shutdown");
        assert!(guard.get_ref().shut);
        assert_eq!(guard.violation(), stats.violation());
        Seen {
            read,
            violation: stats.violation(),
            reply: guard.get_ref().written.clone(),
        }
    }

    /// The input whole, in 1-byte pieces, and split in two at every point (at every 61st point
    /// for long inputs).
    fn splits(input: &[u8]) -> Vec<Vec<Vec<u8>>> {
        let mut all = vec![
            vec![input.to_vec()],
            input.iter().map(|&b| vec![b]).collect(),
        ];
        let step = if input.len() > 512 { 61 } else { 1 };
        for at in (1..input.len()).step_by(step) {
            all.push(vec![input[..at].to_vec(), input[at..].to_vec()]);
        }
        all
    }

    /// Feed `input` every way and expect `want`.
    async fn expect_all(input: &[u8], max_head: usize, want: &Seen) {
        for chunks in splits(input) {
            for read_size in [1, 7, 24, 8192] {
                let sizes: Vec<usize> = chunks.iter().map(Vec::len).collect();
                let seen = run(chunks.clone(), read_size, max_head).await;
                assert_eq!(
                    &seen,
                    want,
                    "pieces {sizes:?}, read size {read_size}, input {:?}",
                    String::from_utf8_lossy(input)
                );
            }
        }
    }

    async fn passes(input: &[u8]) {
        let want = Seen {
            read: input.to_vec(),
            violation: None,
            reply: Vec::new(),
        };
        expect_all(input, DEFAULT_MAX_HEAD_BYTES, &want).await;
    }

    /// `prefix` passes, then EOF; shutdown writes the 400.
    async fn rejects_head(prefix: &[u8], bad: &[u8], violation: Violation) {
        rejects(prefix, bad, violation, BAD_REQUEST, DEFAULT_MAX_HEAD_BYTES).await;
    }

    /// `prefix` passes, then EOF; nothing is written on shutdown.
    async fn rejects_body(prefix: &[u8], bad: &[u8], violation: Violation) {
        rejects(prefix, bad, violation, b"", DEFAULT_MAX_HEAD_BYTES).await;
    }

    async fn rejects(prefix: &[u8], bad: &[u8], violation: Violation, reply: &[u8], max: usize) {
        let input = [prefix, bad].concat();
        let want = Seen {
            read: prefix.to_vec(),
            violation: Some(violation),
            reply: reply.to_vec(),
        };
        expect_all(&input, max, &want).await;
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    const POST: &[u8] = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length:  5 \r\n\r\nhel\nl";
    const CHUNKED: &[u8] = b"POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: Chunked\r\n\r\n\
5;name=val;q=\"a \\\"b\\\" \xff\"\r\nhello\r\n6 ; x ; y = z\r\n world\r\n\
000;end\r\nExpires: never\r\nX-T: 1\r\n\r\n";
    const CHUNKED_HEAD: &[u8] = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";

    #[tokio::test]
    async fn valid_requests_pass_unchanged() {
        passes(GET).await;
        passes(POST).await;
        passes(CHUNKED).await;
        passes(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n").await;
        passes(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade-Insecure-Requests: 1\r\n\r\n").await;
        let long_cl = [
            POST,
            b"POST / HTTP/1.1\r\nContent-Length: 300\r\n\r\n",
            &[b'\n'; 300],
        ];
        passes(&long_cl.concat()).await;
    }

    #[tokio::test]
    async fn pipelined_requests_pass_unchanged() {
        passes(&[GET, POST, CHUNKED, GET, CHUNKED].concat()).await;
    }

    #[tokio::test]
    async fn h2_preface_passes_through() {
        passes(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\n\r\n\n").await;
        // Only as the connection's first bytes; later it is an HTTP/1 head (that hyper refuses).
        let later = [GET, b"PRI * HTTP/2.0\r\n\r\n"].concat();
        rejects_head(&later, b"SM\n\r\n", Violation::BareLf).await;
    }

    #[tokio::test]
    async fn upgrade_and_connect_pass_through() {
        let ws =
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUPGRADE: websocket\r\n\r\n";
        passes(&[GET, ws, b"\x81\x05hel\nlo GET / HTTP/1.1\nHost: a\n\n"].concat()).await;
        let h2c = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n\
Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n";
        passes(&[h2c.as_slice(), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\n\n"].concat()).await;
        passes(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n\x16\x03\x01\n\r").await;
    }

    #[tokio::test]
    async fn content_length_with_transfer_encoding_is_rejected() {
        let cl_te = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\
Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        rejects_head(b"", cl_te, Violation::ContentLengthWithTransferEncoding).await;
        rejects_head(GET, cl_te, Violation::ContentLengthWithTransferEncoding).await;
        let te_cl = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\ncontent-length: 5\r\n\r\n";
        rejects_head(POST, te_cl, Violation::ContentLengthWithTransferEncoding).await;
    }

    #[tokio::test]
    async fn transfer_encoding_other_than_chunked_is_rejected() {
        let gzip = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        rejects_head(GET, gzip, Violation::UnsupportedTransferEncoding).await;
        let twice =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n";
        rejects_head(b"", twice, Violation::DuplicateTransferEncoding).await;
        let long = [
            b"POST / HTTP/1.1\r\nTransfer-Encoding: ",
            &[b'x'; 70][..],
            b"\r\n\r\n",
        ];
        rejects_head(b"", &long.concat(), Violation::UnsupportedTransferEncoding).await;
    }

    #[tokio::test]
    async fn bad_content_length_is_rejected() {
        let twice = b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx";
        rejects_head(GET, twice, Violation::DuplicateContentLength).await;
        for value in [
            &b"5a"[..],
            b"+1",
            b"1, 1",
            b"",
            b"-1",
            b"99999999999999999999",
        ] {
            let head = [b"POST / HTTP/1.1\r\nContent-Length: ", value, b"\r\n\r\n"].concat();
            rejects_head(GET, &head, Violation::InvalidContentLength).await;
        }
    }

    #[tokio::test]
    async fn bad_line_endings_are_rejected() {
        let lf = Violation::BareLf;
        rejects_head(b"", b"GET / HTTP/1.1\nHost: a\n\n", lf).await;
        rejects_head(GET, b"GET / HTTP/1.1\nHost: a\r\n\r\n", lf).await;
        rejects_head(GET, b"GET / HTTP/1.1\r\nHost: a\n\r\n", lf).await;
        rejects_head(POST, b"GET / HTTP/1.1\r\nHost: a\r\n\n", lf).await;
        rejects_head(b"", b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", lf).await;
        let cr = Violation::BareCr;
        rejects_head(GET, b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", cr).await;
        rejects_head(b"", b"GET / HTTP/1.1\r\r\n\r\n", cr).await;
        let fold = b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n";
        rejects_head(GET, fold, Violation::ObsFold).await;
    }

    #[tokio::test]
    async fn oversized_head_gets_431() {
        let head = [b"GET / HTTP/1.1\r\nX: ", &[b'a'; 100][..], b"\r\n\r\n"].concat();
        let too_large = Violation::HeadTooLarge;
        rejects(GET, &head, too_large, HEADERS_TOO_LARGE, 100).await;
        // At the limit it passes.
        let at_limit = Seen {
            read: head.clone(),
            violation: None,
            reply: Vec::new(),
        };
        expect_all(&head, head.len(), &at_limit).await;
    }

    #[tokio::test]
    async fn bad_chunk_framing_is_rejected() {
        let size = Violation::InvalidChunkSize;
        rejects_body(CHUNKED_HEAD, b"zz\r\n", size).await;
        rejects_body(CHUNKED_HEAD, b";a\r\n", size).await;
        rejects_body(CHUNKED_HEAD, b"\r\n", size).await;
        rejects_body(CHUNKED_HEAD, b"00000000000000001\r\n", size).await;
        let data = [CHUNKED_HEAD, b"5\r\nhello\r\n"].concat();
        rejects_body(&data, b"-5\r\n", size).await;
        rejects_body(CHUNKED_HEAD, b"5\nhello\r\n0\r\n\r\n", Violation::BareLf).await;
        rejects_body(&data, b"0\n\r\n", Violation::BareLf).await;
        rejects_body(CHUNKED_HEAD, b"5\rhello", Violation::BareCr).await;
        let ext = Violation::InvalidChunkExtension;
        for line in [
            &b"5;a b\r\n"[..],
            b"5;\x01\r\n",
            b"5;=x\r\n",
            b"5 \r\n",
            b"5;a=\r\n",
        ] {
            rejects_body(CHUNKED_HEAD, line, ext).await;
        }
        rejects_body(CHUNKED_HEAD, b"5;a=\"x\nhello\"\r\n", Violation::BareLf).await;
        let long = [b"1;", &[b'a'; MAX_CHUNK_LINE_BYTES][..], b"\r\n"].concat();
        rejects_body(CHUNKED_HEAD, &long, Violation::ChunkLineTooLong).await;
        let no_crlf = [CHUNKED_HEAD, b"5\r\nhello"].concat();
        rejects_body(&no_crlf, b"X\r\n0\r\n\r\n", Violation::MissingChunkCrlf).await;
        let last = [CHUNKED_HEAD, b"0\r\n"].concat();
        rejects_body(&last, b"X: a\n\r\n", Violation::BareLf).await;
        rejects_body(&last, b"X: a\r\n b\r\n\r\n", Violation::ObsFold).await;
    }

    #[tokio::test]
    async fn vectored_writes_pass_through() {
        let stats = Arc::new(GuardStats::default());
        let mut guard = H1Guard::new(Script::default(), stats);
        assert!(guard.is_write_vectored());
        let bufs = [io::IoSlice::new(b"HTTP/1.1 "), io::IoSlice::new(b"200 OK")];
        let n = poll_fn(|cx| Pin::new(&mut guard).poll_write_vectored(cx, &bufs))
            .await
            .expect("write");
        assert_eq!(n, 15);
        guard.write_all(b"\r\n").await.expect("write");
        guard.flush().await.expect("flush");
        guard.shutdown().await.expect("shutdown");
        // No violation: nothing is added on shutdown.
        assert_eq!(guard.get_ref().written, b"HTTP/1.1 200 OK\r\n");
        assert!(guard.get_ref().shut);
    }

    mod end_to_end {
        use std::convert::Infallible;

        use bytes::Bytes;
        use http_body_util::Full;
        use hyper::server::conn::http1;
        use hyper::service::service_fn;
        use hyper::{Request, Response};
        use hyper_util::rt::{TokioExecutor, TokioIo};
        use hyper_util::server::conn::auto;
        use tokio::net::{TcpListener, TcpStream};

        use super::*;

        const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n";

        async fn hello(
            _: Request<hyper::body::Incoming>,
        ) -> Result<Response<Full<Bytes>>, Infallible> {
            Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }

        /// How the test server is built.
        #[derive(Clone, Copy)]
        enum Server {
            /// hyper's HTTP/1 server with its defaults.
            Http1,
            /// hyper's HTTP/1 server with `half_close(true)`: it does not look for EOF while a
            /// request is in flight, so it answers pipelined requests before the guard's EOF.
            Http1HalfClose,
            /// hyper-util's HTTP/1 + HTTP/2 server, as the gateway uses.
            Auto,
        }

        /// Serve one connection through the guard; returns the address and the stats.
        async fn serve_one(server: Server) -> (std::net::SocketAddr, Arc<GuardStats>) {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let address = listener.local_addr().expect("address");
            let stats = Arc::new(GuardStats::default());
            let guard_stats = stats.clone();
            tokio::spawn(async move {
                let (stream, _) = listener.accept().await.expect("accept");
                let io = TokioIo::new(H1Guard::new(stream, guard_stats));
                let service = service_fn(hello);
                let _ = match server {
                    Server::Auto => {
                        auto::Builder::new(TokioExecutor::new())
                            .serve_connection_with_upgrades(io, service)
                            .await
                    }
                    Server::Http1 | Server::Http1HalfClose => http1::Builder::new()
                        .half_close(matches!(server, Server::Http1HalfClose))
                        .serve_connection(io, service)
                        .await
                        .map_err(Into::into),
                };
            });
            (address, stats)
        }

        async fn read_to_end(client: &mut TcpStream) -> Vec<u8> {
            let mut all = Vec::new();
            client.read_to_end(&mut all).await.expect("read");
            all
        }

        const CL_TE: &[u8] = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\
Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n";

        #[tokio::test]
        async fn keep_alive_then_smuggling_attempt_gets_400_and_close() {
            let (address, stats) = serve_one(Server::Http1).await;
            let mut client = TcpStream::connect(address).await.expect("connect");
            client.write_all(GET).await.expect("write");
            let mut response = Vec::new();
            let mut buf = [0; 1024];
            while !response.ends_with(b"\r\n\r\nok") {
                let n = client.read(&mut buf).await.expect("read");
                assert!(
                    n > 0,
                    "closed after {:?}",
                    String::from_utf8_lossy(&response)
                );
                response.extend_from_slice(&buf[..n]);
            }
            assert!(response.starts_with(OK), "{response:?}");
            client.write_all(CL_TE).await.expect("write");
            assert_eq!(read_to_end(&mut client).await, BAD_REQUEST);
            assert_eq!(
                stats.violation(),
                Some(Violation::ContentLengthWithTransferEncoding)
            );
        }

        #[tokio::test]
        async fn pipelined_request_is_answered_before_the_400() {
            let (address, stats) = serve_one(Server::Http1HalfClose).await;
            let mut client = TcpStream::connect(address).await.expect("connect");
            client
                .write_all(&[GET, CL_TE].concat())
                .await
                .expect("write");
            let all = read_to_end(&mut client).await;
            assert!(all.starts_with(OK), "{:?}", String::from_utf8_lossy(&all));
            assert!(all.ends_with(&[b"\r\n\r\nok", BAD_REQUEST].concat()));
            assert_eq!(
                stats.reason(),
                Some("content-length with transfer-encoding")
            );
        }

        #[tokio::test]
        async fn first_request_through_auto_builder_gets_400() {
            let (address, stats) = serve_one(Server::Auto).await;
            let mut client = TcpStream::connect(address).await.expect("connect");
            // hyper-util's version detection reads the first 24 bytes on their own: the guard
            // must hold them back until the head is checked.
            client
                .write_all(b"GET / HTTP/1.1\r\nHost: a\n\r\n")
                .await
                .expect("write");
            assert_eq!(read_to_end(&mut client).await, BAD_REQUEST);
            assert_eq!(stats.violation(), Some(Violation::BareLf));
        }
    }
}
