//! HTTP callouts (`proxy_http_call`) and unary gRPC calls (`proxy_grpc_call`), both sent
//! through [`crate::HostEnv::http_call`]. Streaming gRPC is in `grpc_stream.rs`.

use std::time::Duration;

use bytes::Bytes;
use wasmtime::{Caller, Linker};

use super::started;
use crate::error::CallError;
use crate::headers;
use crate::memory::{self, HostResult, finish};
use crate::state::{CalloutKind, HostState, NewCallout};
use crate::types::Status;

/// Extra trailers of a callout request, carried in the request's extensions.
#[derive(Debug, Clone, Default)]
pub struct CallTrailers(pub http::HeaderMap);

#[allow(clippy::too_many_arguments)]
fn http_call(
    c: &mut Caller<'_, HostState>,
    up: (i32, i32),
    hdr: (i32, i32),
    body: (i32, i32),
    trl: (i32, i32),
    timeout_ms: i32,
    ret_token: i32,
) -> HostResult {
    started(c)?;
    memory::check(c, ret_token, 4)?;
    let cluster = memory::read_string(c, up.0, up.1)?;
    let raw_headers = memory::read(c, hdr.0, hdr.1)?;
    let body = memory::read(c, body.0, body.1)?;
    let raw_trailers = memory::read(c, trl.0, trl.1)?;
    if !c.data().shared.env.has_cluster(&cluster) {
        return Err(Status::BadArgument.into());
    }
    let pairs = headers::deserialize(&raw_headers)?;
    let (mut method, mut path, mut authority) = (None, None, None);
    let mut map = http::HeaderMap::with_capacity(pairs.len());
    for (k, v) in &pairs {
        match &k[..] {
            b":method" => {
                method = Some(http::Method::from_bytes(v).map_err(|_| Status::BadArgument)?)
            }
            b":path" => path = Some(String::from_utf8(v.clone()).map_err(|_| Status::BadArgument)?),
            b":authority" => authority = Some(headers::value(v)?),
            k if k.starts_with(b":") => {}
            _ => {
                map.append(headers::name(k)?, headers::value(v)?);
            }
        }
    }
    let (Some(method), Some(path), Some(authority)) = (method, path, authority) else {
        return Err(Status::BadArgument.into());
    };
    let uri: http::Uri = path.parse().map_err(|_| Status::BadArgument)?;
    map.insert(http::header::HOST, authority);
    let mut request = http::Request::new(Bytes::from(body));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = map;
    let trailers = headers::deserialize(&raw_trailers)?;
    if !trailers.is_empty() {
        let mut t = http::HeaderMap::new();
        for (k, v) in &trailers {
            t.append(headers::name(k)?, headers::value(v)?);
        }
        request.extensions_mut().insert(CallTrailers(t));
    }
    let token = issue(c, &cluster, request, timeout_ms, CalloutKind::Http);
    memory::write_u32(c, ret_token, token)
}

/// Start `request` to `cluster` through the gateway, as a new callout of the effective context.
fn issue(
    c: &mut Caller<'_, HostState>,
    cluster: &str,
    request: http::Request<Bytes>,
    timeout_ms: i32,
    kind: CalloutKind,
) -> u32 {
    let env = c.data().shared.env.clone();
    let timeout =
        (timeout_ms as u32 > 0).then(|| Duration::from_millis(u64::from(timeout_ms as u32)));
    let call = env.http_call(cluster, request, timeout);
    let future = Box::pin(async move {
        match timeout {
            Some(t) => tokio::time::timeout(t, call)
                .await
                .unwrap_or(Err(CallError::Timeout)),
            None => call.await,
        }
    });
    let state = c.data_mut();
    let token = next_token(state);
    state.live_callouts.insert(token, kind);
    let owner = state.effective;
    state.new_callouts.push(NewCallout {
        token,
        owner,
        future,
    });
    token
}

/// A new callout or gRPC stream token: non-zero, unique among the VM's live callouts and
/// streams.
pub(super) fn next_token(state: &mut HostState) -> u32 {
    let mut token = state.next_token;
    loop {
        token = token.wrapping_add(1).max(1);
        if !state.live_callouts.contains_key(&token) && !state.grpc.contains(token) {
            break;
        }
    }
    state.next_token = token;
    token
}

/// The request head of a gRPC call or stream to `cluster`: `POST /{service}/{method}` over
/// HTTP/2 with the guest's metadata (pseudo-headers skipped), `content-type:
/// application/grpc`, `te: trailers` and `Host` = the cluster. Malformed metadata or names are
/// `PARSE_FAILURE` (a status the SDKs accept here).
pub(super) fn grpc_request(
    cluster: &str,
    service: &str,
    method: &str,
    raw_metadata: &[u8],
) -> Result<http::Request<()>, Status> {
    let uri: http::Uri = format!("/{service}/{method}")
        .parse()
        .map_err(|_| Status::ParseFailure)?;
    let mut map = http::HeaderMap::new();
    for (k, v) in headers::deserialize(raw_metadata).map_err(|_| Status::ParseFailure)? {
        if k.starts_with(b":") {
            continue;
        }
        map.append(
            headers::name(&k).map_err(|_| Status::ParseFailure)?,
            headers::value(&v).map_err(|_| Status::ParseFailure)?,
        );
    }
    map.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    map.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    map.insert(
        http::header::HOST,
        http::HeaderValue::from_str(cluster).map_err(|_| Status::ParseFailure)?,
    );
    let mut request = http::Request::new(());
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = uri;
    *request.version_mut() = http::Version::HTTP_2;
    *request.headers_mut() = map;
    Ok(request)
}

/// `proxy_grpc_call`: a unary gRPC call sent as an HTTP/2 request through
/// [`crate::HostEnv::http_call`] (`POST /{service}/{method}`, `content-type:
/// application/grpc`, the message in one uncompressed frame). `service` names the cluster.
#[allow(clippy::too_many_arguments)]
fn grpc_call(
    c: &mut Caller<'_, HostState>,
    svc: (i32, i32),
    name: (i32, i32),
    method: (i32, i32),
    metadata: (i32, i32),
    message: (i32, i32),
    timeout_ms: i32,
    ret_token: i32,
) -> HostResult {
    started(c)?;
    memory::check(c, ret_token, 4)?;
    let cluster = memory::read_string(c, svc.0, svc.1)?;
    let service = memory::read_string(c, name.0, name.1)?;
    let method = memory::read_string(c, method.0, method.1)?;
    let raw_metadata = memory::read(c, metadata.0, metadata.1)?;
    let message = memory::read(c, message.0, message.1)?;
    if !c.data().shared.env.has_cluster(&cluster) {
        // Envoy's answer, as for gRPC streams (the SDKs accept INTERNAL_FAILURE and
        // PARSE_FAILURE here, not BAD_ARGUMENT).
        return Err(Status::ParseFailure.into());
    }
    let head = grpc_request(&cluster, &service, &method, &raw_metadata)?;
    let mut body = Vec::with_capacity(5 + message.len());
    body.push(0);
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    let request = head.map(|()| Bytes::from(body));
    let token = issue(c, &cluster, request, timeout_ms, CalloutKind::Grpc);
    memory::write_u32(c, ret_token, token)
}

pub(super) fn add(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    for name in ["proxy_http_call", "proxy_dispatch_http_call"] {
        linker.func_wrap(
            "env",
            name,
            |mut c: Caller<'_, HostState>,
             up: i32,
             upl: i32,
             hp: i32,
             hl: i32,
             bp: i32,
             bl: i32,
             tp: i32,
             tl: i32,
             timeout: i32,
             ret: i32| {
                finish(http_call(
                    &mut c,
                    (up, upl),
                    (hp, hl),
                    (bp, bl),
                    (tp, tl),
                    timeout,
                    ret,
                ))
            },
        )?;
    }
    linker.func_wrap(
        "env",
        "proxy_grpc_call",
        |mut c: Caller<'_, HostState>,
         sp: i32,
         sl: i32,
         np: i32,
         nl: i32,
         mp: i32,
         ml: i32,
         hp: i32,
         hl: i32,
         bp: i32,
         bl: i32,
         timeout: i32,
         ret: i32| {
            finish(grpc_call(
                &mut c,
                (sp, sl),
                (np, nl),
                (mp, ml),
                (hp, hl),
                (bp, bl),
                timeout,
                ret,
            ))
        },
    )?;
    Ok(())
}
