//! gRPC streams (`proxy_grpc_stream`, `proxy_grpc_send`) and the calls shared with unary gRPC
//! calls (`proxy_grpc_cancel`, `proxy_grpc_close`), with Envoy's statuses. The streams
//! themselves live in [`crate::grpc_stream`].

use wasmtime::{Caller, Linker};

use super::callouts::{grpc_request, next_token};
use super::started;
use crate::grpc_stream::{self, Inbox, Sink};
use crate::memory::{self, HostResult, finish};
use crate::state::{CalloutKind, HostState};
use crate::types::Status;

/// `proxy_grpc_stream(cluster, service, method, initial metadata, ret_token)`: open a stream
/// owned by the effective context (a root context, or the HTTP stream whose callback runs).
/// An unknown cluster is `PARSE_FAILURE` (Envoy's answer, and the one the SDKs accept);
/// a stream the environment cannot open (no client, no HTTP/2, no tokio runtime, or an owner
/// that is another, paused HTTP stream) is `INTERNAL_FAILURE`.
fn open(
    c: &mut Caller<'_, HostState>,
    upstream: (i32, i32),
    service: (i32, i32),
    method: (i32, i32),
    metadata: (i32, i32),
    ret_token: i32,
) -> HostResult {
    started(c)?;
    memory::check(c, ret_token, 4)?;
    let cluster = memory::read_string(c, upstream.0, upstream.1)?;
    let service = memory::read_string(c, service.0, service.1)?;
    let method = memory::read_string(c, method.0, method.1)?;
    let raw_metadata = memory::read(c, metadata.0, metadata.1)?;
    let env = c.data().shared.env.clone();
    if !env.has_cluster(&cluster) {
        return Err(Status::ParseFailure.into());
    }
    let head = grpc_request(&cluster, &service, &method, &raw_metadata)?;
    let rt = tokio::runtime::Handle::try_current().map_err(|_| Status::InternalFailure)?;
    let state = c.data_mut();
    let effective = state.effective;
    let (owner, sink) = if let Some(s) = state.stream_mut() {
        (s.id, s.grpc.get_or_insert_with(Inbox::new).sink())
    } else if state.roots.contains_key(&effective) {
        let events = state.shared.events.clone();
        let sink = Sink::Root {
            events,
            owner: effective,
        };
        (effective, sink)
    } else {
        // Another HTTP stream made effective: its driver is not here to take the events.
        return Err(Status::InternalFailure.into());
    };
    let (tx, body) = grpc_stream::outbound();
    let response = env
        .grpc_stream(&cluster, head.map(|()| body))
        .map_err(|e| {
            tracing::debug!(plugin = %state.plugin_name(), "wasm gRPC stream not opened: {e}");
            Status::InternalFailure
        })?;
    let token = next_token(state);
    state.grpc.start(&rt, token, owner, tx, response, sink);
    memory::write_u32(c, ret_token, token)
}

/// `proxy_grpc_send(token, message, end_stream)`. A unary call's token is `BAD_ARGUMENT`, an
/// unknown one `NOT_FOUND`.
fn send(c: &mut Caller<'_, HostState>, token: i32, ptr: i32, len: i32, end: i32) -> HostResult {
    started(c)?;
    let message = memory::read(c, ptr, len)?;
    let token = token as u32;
    let state = c.data_mut();
    if state.live_callouts.get(&token) == Some(&CalloutKind::Grpc) {
        return Err(Status::BadArgument.into());
    }
    Ok(state.grpc.send(token, &message, end != 0)?)
}

/// `proxy_grpc_cancel` (`close` false) or `proxy_grpc_close` (`close` true). A unary call is
/// forgotten either way (no callback follows); a stream is reset, or half-closed.
fn end(c: &mut Caller<'_, HostState>, token: i32, close: bool) -> HostResult {
    started(c)?;
    let token = token as u32;
    let state = c.data_mut();
    if state.live_callouts.get(&token) == Some(&CalloutKind::Grpc) {
        state.live_callouts.remove(&token);
        return Ok(());
    }
    let r = if close {
        state.grpc.close(token)
    } else {
        state.grpc.cancel(token)
    };
    Ok(r?)
}

pub(super) fn add(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_grpc_stream",
        |mut c: Caller<'_, HostState>,
         up: i32,
         upl: i32,
         sp: i32,
         sl: i32,
         mp: i32,
         ml: i32,
         hp: i32,
         hl: i32,
         ret: i32| { finish(open(&mut c, (up, upl), (sp, sl), (mp, ml), (hp, hl), ret)) },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_send",
        |mut c: Caller<'_, HostState>, token: i32, p: i32, l: i32, end_stream: i32| {
            finish(send(&mut c, token, p, l, end_stream))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_cancel",
        |mut c: Caller<'_, HostState>, token: i32| finish(end(&mut c, token, false)),
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_close",
        |mut c: Caller<'_, HostState>, token: i32| finish(end(&mut c, token, true)),
    )?;
    Ok(())
}
