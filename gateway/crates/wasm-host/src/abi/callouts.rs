//! HTTP callouts (`proxy_http_call`) and gRPC (not supported yet: answers a status the SDKs
//! turn into an error, never a missing import).

use std::time::Duration;

use bytes::Bytes;
use wasmtime::{Caller, Linker};

use super::started;
use crate::error::CallError;
use crate::headers;
use crate::memory::{self, HostResult, finish};
use crate::state::{HostState, NewCallout};
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
    let env = c.data().shared.env.clone();
    if !env.has_cluster(&cluster) {
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
    let timeout =
        (timeout_ms as u32 > 0).then(|| Duration::from_millis(u64::from(timeout_ms as u32)));
    let call = env.http_call(&cluster, request, timeout);
    let future = Box::pin(async move {
        match timeout {
            Some(t) => tokio::time::timeout(t, call)
                .await
                .unwrap_or(Err(CallError::Timeout)),
            None => call.await,
        }
    });
    let state = c.data_mut();
    state.next_token = state.next_token.wrapping_add(1).max(1);
    let token = state.next_token;
    let owner = state.effective;
    state.new_callouts.push(NewCallout {
        token,
        owner,
        future,
    });
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
    // gRPC is not supported yet: calls answer INTERNAL_FAILURE (the Rust SDK returns it as an
    // error), operations on tokens NOT_FOUND.
    linker.func_wrap(
        "env",
        "proxy_grpc_call",
        |_c: Caller<'_, HostState>,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32| Ok(Status::InternalFailure.code()),
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_stream",
        |_c: Caller<'_, HostState>,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32| Ok(Status::InternalFailure.code()),
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_send",
        |_c: Caller<'_, HostState>, _: i32, _: i32, _: i32, _: i32| Ok(Status::NotFound.code()),
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_cancel",
        |_c: Caller<'_, HostState>, _: i32| Ok(Status::NotFound.code()),
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_close",
        |_c: Caller<'_, HostState>, _: i32| Ok(Status::NotFound.code()),
    )?;
    Ok(())
}
