//! Buffers: bodies, network data, callout response bodies, configurations.

use bytes::Bytes;
use wasmtime::{Caller, Linker};

use super::started;
use crate::memory::{self, HostResult, finish};
use crate::state::{BodyKind, HostState, Phase};
use crate::types::{Status, buffer};

fn bytes_of(state: &HostState, which: i32) -> Result<Bytes, Status> {
    let body = |kind: BodyKind| -> Result<Bytes, Status> {
        match state.stream_ref().and_then(|s| s.body.as_ref()) {
            Some((k, b)) if *k == kind => Ok(b.clone()),
            _ => Err(Status::NotFound),
        }
    };
    match which {
        buffer::REQUEST_BODY => body(BodyKind::Request),
        buffer::RESPONSE_BODY => body(BodyKind::Response),
        buffer::DOWNSTREAM_DATA => body(BodyKind::Downstream),
        buffer::UPSTREAM_DATA => body(BodyKind::Upstream),
        buffer::HTTP_CALL_RESPONSE_BODY => state
            .callout
            .as_ref()
            .map(|c| c.body.clone())
            .ok_or(Status::NotFound),
        buffer::GRPC_RECEIVE_BUFFER => state.grpc_message.clone().ok_or(Status::NotFound),
        buffer::VM_CONFIGURATION if state.phase == Phase::VmStart => {
            Ok(state.shared.vm_configuration.clone())
        }
        buffer::PLUGIN_CONFIGURATION if state.phase == Phase::Configure => state
            .root()
            .map(|r| r.configuration.clone())
            .ok_or(Status::NotFound),
        buffer::VM_CONFIGURATION | buffer::PLUGIN_CONFIGURATION | buffer::CALL_DATA => {
            Err(Status::NotFound)
        }
        _ => Err(Status::BadArgument),
    }
}

/// `proxy_get_buffer_bytes(type, start, max, ret_ptr, ret_len)`.
pub(super) fn get(
    caller: &mut Caller<'_, HostState>,
    which: i32,
    start: i32,
    max: i32,
    ret_ptr: i32,
    ret_len: i32,
) -> HostResult {
    started(caller)?;
    let data = bytes_of(caller.data(), which)?;
    let start = start as u32 as usize;
    let max = max as u32 as usize;
    if start > data.len() {
        return Err(Status::BadArgument.into());
    }
    let end = start.saturating_add(max).min(data.len());
    memory::return_bytes(caller, &data[start..end], ret_ptr, ret_len)
}

/// `proxy_set_buffer_bytes(type, start, size, ptr, len)`: replace `size` bytes at `start`
/// (`start` 0 and `size` ≥ the length replaces all; `start` at or past the end appends).
fn set(
    caller: &mut Caller<'_, HostState>,
    which: i32,
    start: i32,
    size: i32,
    ptr: i32,
    len: i32,
) -> HostResult {
    started(caller)?;
    let data = memory::read(caller, ptr, len)?;
    let kind = match which {
        buffer::REQUEST_BODY => BodyKind::Request,
        buffer::RESPONSE_BODY => BodyKind::Response,
        buffer::DOWNSTREAM_DATA => BodyKind::Downstream,
        buffer::UPSTREAM_DATA => BodyKind::Upstream,
        buffer::HTTP_CALL_RESPONSE_BODY | 5 | 6 | 7 | 8 => {
            return Err(Status::NotFound.into());
        }
        _ => return Err(Status::BadArgument.into()),
    };
    let stream = caller.data_mut().stream_mut().ok_or(Status::NotFound)?;
    let Some((k, body)) = stream.body.as_mut() else {
        return Err(Status::NotFound.into());
    };
    if *k != kind {
        return Err(Status::NotFound.into());
    }
    let start = (start as u32 as usize).min(body.len());
    let end = start.saturating_add(size as u32 as usize).min(body.len());
    let mut out = bytes::BytesMut::with_capacity(body.len() - (end - start) + data.len());
    out.extend_from_slice(&body[..start]);
    out.extend_from_slice(&data);
    out.extend_from_slice(&body[end..]);
    *body = out.freeze();
    Ok(())
}

pub(super) fn add(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: Caller<'_, HostState>, which: i32, start: i32, max: i32, rp: i32, rl: i32| {
            finish(get(&mut c, which, start, max, rp, rl))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: Caller<'_, HostState>, which: i32, start: i32, size: i32, p: i32, l: i32| {
            finish(set(&mut c, which, start, size, p, l))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_buffer_status",
        |mut c: Caller<'_, HostState>, which: i32, ret_len: i32, ret_flags: i32| {
            finish((|| {
                started(&c)?;
                let data = bytes_of(c.data(), which)?;
                memory::write_u32(&mut c, ret_len, data.len() as u32)?;
                memory::write_u32(&mut c, ret_flags, 0)
            })())
        },
    )?;
    Ok(())
}
