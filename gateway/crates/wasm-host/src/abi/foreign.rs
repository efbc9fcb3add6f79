//! Foreign functions: `proxy_call_foreign_function(name, args) -> result`, served by the host
//! itself for [`GET_PROPERTIES_FUNCTION`](crate::GET_PROPERTIES_FUNCTION), else by
//! [`crate::HostEnv::foreign_function`].

use wasmtime::{Caller, Linker};

use super::started;
use crate::memory::{self, HostResult, finish};
use crate::properties;
use crate::state::HostState;
use crate::types::Status;

fn call(
    c: &mut Caller<'_, HostState>,
    np: i32,
    nl: i32,
    ap: i32,
    al: i32,
    rp: i32,
    rl: i32,
) -> HostResult {
    started(c)?;
    memory::check(c, rp, 4)?;
    memory::check(c, rl, 4)?;
    // The host's own function is recognised in place: its name is not copied out.
    let own = memory::with_slice(c, np, nl, |name, _| {
        name == crate::GET_PROPERTIES_FUNCTION.as_bytes()
    })?;
    if own {
        let result = memory::with_slice(c, ap, al, properties::get_many)??;
        return memory::return_bytes(c, &result, rp, rl);
    }
    let name = memory::read_string(c, np, nl)?;
    let args = memory::read(c, ap, al)?;
    let f = c
        .data()
        .shared
        .env
        .foreign_function(&name)
        .ok_or(Status::NotFound)?;
    let result = f(&args)?;
    memory::return_bytes(c, &result, rp, rl)
}

pub(super) fn add(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |mut c: Caller<'_, HostState>, np: i32, nl: i32, ap: i32, al: i32, rp: i32, rl: i32| {
            finish(call(&mut c, np, nl, ap, al, rp, rl))
        },
    )?;
    Ok(())
}
