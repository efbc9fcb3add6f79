//! Properties (`proxy_get_property`) with Envoy's attribute names and encodings.
//!
//! Strings are raw bytes; integers, durations (ns) and timestamps (Unix ns) are 8-byte
//! little-endian; booleans one byte; maps in the header-map encoding.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::headers::MapRef;
use crate::state::HostState;
use crate::types::Status;

/// A property's value, borrowed from the stream where it can be: looking one up allocates only
/// for addresses and header maps.
#[derive(Debug)]
pub(crate) enum Value<'a> {
    /// 8-byte little-endian integer (also durations and timestamps).
    Int(u64),
    /// One byte (booleans).
    Byte(u8),
    /// Raw bytes (strings).
    Bytes(&'a [u8]),
    /// Bytes made for this lookup (addresses, serialized maps).
    Owned(Vec<u8>),
}

impl Value<'_> {
    /// Append the encoded value to `out`.
    pub(crate) fn write_to(&self, out: &mut Vec<u8>) {
        match self {
            Value::Int(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::Byte(b) => out.push(*b),
            Value::Bytes(b) => out.extend_from_slice(b),
            Value::Owned(b) => out.extend_from_slice(b),
        }
    }
}

fn int<'a>(v: u64) -> Value<'a> {
    Value::Int(v)
}

fn text(s: &str) -> Value<'_> {
    Value::Bytes(s.as_bytes())
}

fn addr<'a>(a: Option<SocketAddr>, part: &[u8]) -> Option<Value<'a>> {
    let a = a?;
    match part {
        b"address" => Some(Value::Owned(a.to_string().into_bytes())),
        b"port" => Some(int(u64::from(a.port()))),
        _ => None,
    }
}

static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
static X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Normalize a property path: segments joined by NUL, a trailing NUL ignored.
pub(crate) fn key(path: &[u8]) -> &[u8] {
    path.strip_suffix(b"\0").unwrap_or(path)
}

/// [`GET_PROPERTIES_FUNCTION`](crate::GET_PROPERTIES_FUNCTION): look up several properties in
/// one call. `args`: a little-endian `u32` count `n`, `n` little-endian `u32` lengths, then the
/// `n` paths (each as `proxy_get_property` takes it: segments separated by NUL). Result: `n`,
/// `n` lengths (`u32::MAX` for a property that does not exist), then the values. Malformed
/// arguments are `BAD_ARGUMENT`.
pub(crate) fn get_many(args: &[u8], state: &HostState) -> Result<Vec<u8>, Status> {
    let u32_at = |at: usize| -> Result<usize, Status> {
        let b = args.get(at..at + 4).ok_or(Status::BadArgument)?;
        Ok(u32::from_le_bytes(b.try_into().map_err(|_| Status::BadArgument)?) as usize)
    };
    let n = u32_at(0)?;
    let mut at = 4usize
        .checked_add(n.checked_mul(4).ok_or(Status::BadArgument)?)
        .ok_or(Status::BadArgument)?;
    if at > args.len() {
        return Err(Status::BadArgument);
    }
    // The lengths are filled in as the values are appended after them. Room for short values
    // (the usual properties), not for whatever a guest's count might promise.
    let mut out = Vec::with_capacity(4 + 4 * n + 16 * n.min(64));
    out.extend_from_slice(&(n as u32).to_le_bytes());
    out.resize(4 + 4 * n, 0);
    for i in 0..n {
        let len = u32_at(4 + 4 * i)?;
        let path = args.get(at..at + len).ok_or(Status::BadArgument)?;
        at += len;
        let written = match get(state, path) {
            Ok(v) => {
                let before = out.len();
                v.write_to(&mut out);
                (out.len() - before) as u32
            }
            Err(Status::NotFound) => u32::MAX,
            Err(e) => return Err(e),
        };
        out[4 + 4 * i..8 + 4 * i].copy_from_slice(&written.to_le_bytes());
    }
    if at != args.len() {
        return Err(Status::BadArgument);
    }
    Ok(out)
}

/// Look up a property for the effective context.
pub(crate) fn get<'a>(state: &'a HostState, path: &[u8]) -> Result<Value<'a>, Status> {
    let path = key(path);
    let stream = state.stream_ref();
    // Values set by the filter (filter state) win.
    if let Some(v) = stream.and_then(|s| s.filter_state.get(path)) {
        return Ok(Value::Bytes(v));
    }
    if let Some(v) = state.root_properties.get(path) {
        return Ok(Value::Bytes(v));
    }
    // The first segments (no property of Envoy's has more than four).
    let mut segs: [&[u8]; 4] = [b""; 4];
    for (slot, s) in segs.iter_mut().zip(path.split(|b| *b == 0)) {
        *slot = s;
    }
    let root = state.root();
    let seg = |i: usize| segs.get(i).copied().unwrap_or(b"");
    let found = match seg(0) {
        b"plugin_name" => root.map(|r| text(&r.plugin_name)),
        b"plugin_root_id" => root.map(|r| text(&r.root_id)),
        b"plugin_vm_id" => Some(text(&state.shared.vm_id)),
        b"connection_id" => stream.map(|s| int(s.info.connection_id)),
        b"source" => stream.and_then(|s| addr(s.info.source, seg(1))),
        b"destination" => stream.and_then(|s| addr(s.info.destination, seg(1))),
        b"upstream" => stream.and_then(|s| addr(s.upstream, seg(1))),
        b"connection" => stream.and_then(|s| {
            let tls = s.info.tls.as_ref();
            match seg(1) {
                b"id" => Some(int(s.info.connection_id)),
                b"mtls" => Some(Value::Byte(u8::from(tls.is_some_and(|t| t.mtls)))),
                b"requested_server_name" => tls.and_then(|t| t.sni.as_deref()).map(text),
                b"tls_version" => tls.map(|t| text(&t.version)),
                b"subject_local_certificate" => {
                    tls.and_then(|t| t.local_subject.as_deref()).map(text)
                }
                b"subject_peer_certificate" => {
                    tls.and_then(|t| t.peer_subject.as_deref()).map(text)
                }
                b"uri_san_peer_certificate" => {
                    tls.and_then(|t| t.peer_uri_sans.first()).map(|s| text(s))
                }
                b"dns_san_peer_certificate" => {
                    tls.and_then(|t| t.peer_dns_sans.first()).map(|s| text(s))
                }
                _ => None,
            }
        }),
        b"xds" => match seg(1) {
            b"route_name" => stream.map(|s| text(&s.info.route_name)),
            b"cluster_name" => {
                stream.map(|s| text(s.cluster.as_deref().unwrap_or(&s.info.cluster_name)))
            }
            b"virtual_host_name" => stream.map(|s| text(&s.info.virtual_host_name)),
            b"listener_name" => stream.map(|s| text(&s.info.listener_name)),
            b"listener_direction" => Some(int(1)),
            _ => None,
        },
        // A network stream has no request or response.
        b"request" => stream.filter(|s| !s.network).and_then(|s| {
            let head = s.request.as_ref();
            let header = |name: &http::HeaderName| {
                head.and_then(|h| h.headers.get(name))
                    .map(|v| Value::Bytes(v.as_bytes()))
            };
            match seg(1) {
                b"path" => head.map(|h| text(&h.path)),
                b"url_path" => head.map(|h| text(h.path.split('?').next().unwrap_or(""))),
                b"query" => head.map(|h| text(h.path.split_once('?').map(|x| x.1).unwrap_or(""))),
                b"host" => head.map(|h| text(&h.authority)),
                b"scheme" => head.map(|h| text(&h.scheme)),
                b"method" => head.map(|h| text(h.method.as_str())),
                b"headers" => head.map(|h| {
                    let mut h = h.clone();
                    Value::Owned(MapRef::Request(&mut h).serialize())
                }),
                b"referer" => header(&http::header::REFERER),
                b"useragent" => header(&http::header::USER_AGENT),
                b"id" => match &s.info.request_id {
                    Some(id) => Some(Value::Bytes(id.as_bytes())),
                    None => header(&X_REQUEST_ID),
                },
                b"time" => Some(int(unix_ns(s.info.start_time))),
                b"duration" => Some(int(SystemTime::now()
                    .duration_since(s.info.start_time)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0))),
                b"protocol" => Some(text(match s.info.protocol {
                    http::Version::HTTP_09 => "HTTP/0.9",
                    http::Version::HTTP_10 => "HTTP/1.0",
                    http::Version::HTTP_2 => "HTTP/2",
                    http::Version::HTTP_3 => "HTTP/3",
                    _ => "HTTP/1.1",
                })),
                b"size" => Some(int(s.request_body_bytes)),
                b"total_size" => Some(int(s.request_body_bytes
                    + head.map_or(0, |h| {
                        h.headers
                            .iter()
                            .map(|(k, v)| (k.as_str().len() + v.len() + 4) as u64)
                            .sum()
                    }))),
                _ => None,
            }
        }),
        b"response" => stream.filter(|s| !s.network).and_then(|s| {
            let head = s.response.as_ref();
            match seg(1) {
                b"code" => head.map(|h| int(u64::from(h.status.as_u16()))),
                b"code_details" => s.response_code_details.as_deref().map(text),
                b"flags" => Some(int(s.response_flags)),
                b"grpc_status" => head
                    .and_then(|h| h.headers.get(&GRPC_STATUS))
                    .or_else(|| {
                        s.response_trailers
                            .as_ref()
                            .and_then(|t| t.get(&GRPC_STATUS))
                    })
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    .map(int),
                b"headers" => head.map(|h| {
                    let mut h = h.clone();
                    Value::Owned(MapRef::Response(&mut h).serialize())
                }),
                b"trailers" => s.response_trailers.as_ref().map(|t| {
                    let mut t = t.clone();
                    Value::Owned(MapRef::Plain(&mut t).serialize())
                }),
                b"size" => Some(int(s.response_body_bytes)),
                b"total_size" => Some(int(s.response_body_bytes
                    + head.map_or(0, |h| {
                        h.headers
                            .iter()
                            .map(|(k, v)| (k.as_str().len() + v.len() + 4) as u64)
                            .sum()
                    }))),
                _ => None,
            }
        }),
        _ => None,
    };
    found.ok_or(Status::NotFound)
}
