//! Logging, time, effective context, timers, `proxy_done`, and the 0.1.0-only calls.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use wasmtime::{Caller, Linker};

use super::started;
use crate::memory::{self, HostResult, finish};
use crate::state::{HostState, Phase};
use crate::types::{LogLevel, Status, buffer};

fn log(caller: &mut Caller<'_, HostState>, level: i32, ptr: i32, len: i32) -> HostResult {
    let level = LogLevel::from_i32(level).ok_or(Status::BadArgument)?;
    let msg = memory::read_string(caller, ptr, len)?;
    let state = caller.data();
    state.shared.env.log(state.plugin_name(), level, &msg);
    Ok(())
}

fn set_tick(caller: &mut Caller<'_, HostState>, period_ms: i32) -> HostResult {
    started(caller)?;
    let state = caller.data();
    let root = state.root().ok_or(Status::BadArgument)?.context_id;
    let period = Duration::from_millis(u64::from(period_ms as u32));
    {
        let mut timers = state
            .shared
            .timers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if period.is_zero() {
            timers.remove(&root);
        } else {
            timers.insert(root, (period, Instant::now() + period));
        }
    }
    state.shared.notify.notify_one();
    Ok(())
}

fn set_effective(caller: &mut Caller<'_, HostState>, ctx: i32) -> HostResult {
    started(caller)?;
    let ctx = ctx as u32;
    let state = caller.data_mut();
    let known = state.roots.contains_key(&ctx)
        || state.streams.contains_key(&ctx)
        || state.stream.as_ref().is_some_and(|s| s.id == ctx);
    if !known {
        return Err(Status::BadArgument.into());
    }
    state.effective = ctx;
    Ok(())
}

/// 0.1.0 `proxy_get_configuration`: the plugin configuration during `on_configure`, the VM
/// configuration during `on_vm_start`.
fn get_configuration(caller: &mut Caller<'_, HostState>, ret_ptr: i32, ret_len: i32) -> HostResult {
    let which = match caller.data().phase {
        Phase::VmStart => buffer::VM_CONFIGURATION,
        Phase::Configure => buffer::PLUGIN_CONFIGURATION,
        _ => return Err(Status::NotFound.into()),
    };
    super::buffers::get(caller, which, 0, i32::MAX, ret_ptr, ret_len)
}

fn continue_dir(caller: &mut Caller<'_, HostState>, request: bool) -> HostResult {
    started(caller)?;
    let s = caller.data_mut().stream_mut().ok_or(Status::NotFound)?;
    if request {
        s.actions.continue_request = true;
    } else {
        s.actions.continue_response = true;
    }
    Ok(())
}

pub(super) fn add(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_log",
        |mut c: Caller<'_, HostState>, level: i32, ptr: i32, len: i32| {
            finish(log(&mut c, level, ptr, len))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut c: Caller<'_, HostState>, ret: i32| {
            let level = c.data().shared.env.log_level().as_i32() as u32;
            finish(memory::write_u32(&mut c, ret, level))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: Caller<'_, HostState>, ret: i32| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            finish(memory::write_u64(&mut c, ret, now))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: Caller<'_, HostState>, period: i32| finish(set_tick(&mut c, period)),
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: Caller<'_, HostState>, ctx: i32| finish(set_effective(&mut c, ctx)),
    )?;
    linker.func_wrap("env", "proxy_done", |c: Caller<'_, HostState>| {
        finish(started(&c))
    })?;
    linker.func_wrap(
        "env",
        "proxy_get_configuration",
        |mut c: Caller<'_, HostState>, ret_ptr: i32, ret_len: i32| {
            finish(get_configuration(&mut c, ret_ptr, ret_len))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_continue_request",
        |mut c: Caller<'_, HostState>| finish(continue_dir(&mut c, true)),
    )?;
    linker.func_wrap(
        "env",
        "proxy_continue_response",
        |mut c: Caller<'_, HostState>| finish(continue_dir(&mut c, false)),
    )?;
    linker.func_wrap(
        "env",
        "proxy_clear_route_cache",
        |mut c: Caller<'_, HostState>| {
            finish((|| {
                started(&c)?;
                let s = c.data_mut().stream_mut().ok_or(Status::NotFound)?;
                s.request_headers_changed = true;
                Ok(())
            })())
        },
    )?;
    Ok(())
}
