//! Metrics defined by filters.

use wasmtime::{Caller, Linker};

use super::started;
use crate::memory::{self, HostResult, finish};
use crate::metrics;
use crate::state::HostState;

fn define(c: &mut Caller<'_, HostState>, kind: i32, np: i32, nl: i32, ret: i32) -> HostResult {
    started(c)?;
    let name = memory::read_string(c, np, nl)?;
    memory::check(c, ret, 4)?;
    let id = metrics::define(kind, &name)?;
    memory::write_u32(c, ret, id)
}

pub(super) fn add(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: Caller<'_, HostState>, kind: i32, np: i32, nl: i32, ret: i32| {
            finish(define(&mut c, kind, np, nl, ret))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |c: Caller<'_, HostState>, id: i32, offset: i64| {
            finish((|| {
                started(&c)?;
                Ok(metrics::increment(id as u32, offset)?)
            })())
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_record_metric",
        |c: Caller<'_, HostState>, id: i32, value: i64| {
            finish((|| {
                started(&c)?;
                Ok(metrics::record(id as u32, value as u64)?)
            })())
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: Caller<'_, HostState>, id: i32, ret: i32| {
            finish((|| {
                started(&c)?;
                memory::check(&c, ret, 8)?;
                let v = metrics::get(id as u32)?;
                memory::write_u64(&mut c, ret, v)
            })())
        },
    )?;
    Ok(())
}
