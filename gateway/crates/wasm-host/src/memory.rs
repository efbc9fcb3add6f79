//! Guest memory access: the only place that touches the guest's linear memory.
//!
//! Every pointer and length that comes from the guest is checked against the memory's current
//! size before use; a bad one answers `INVALID_MEMORY_ACCESS` instead of trapping or panicking.
//! Built on wasmtime's safe `Memory::data`/`data_mut`, so no `unsafe` is needed.

use wasmtime::{AsContext, AsContextMut, Caller};

use crate::state::HostState;
use crate::types::Status;

/// Why a host call did not answer OK: either a status for the guest, or a trap that aborts the
/// callback (a trapping allocator, `proc_exit`).
pub(crate) enum Fail {
    /// Answer this status to the guest.
    Status(Status),
    /// Abort the guest call with this error.
    Trap(wasmtime::Error),
}

impl From<Status> for Fail {
    fn from(s: Status) -> Self {
        Fail::Status(s)
    }
}

/// Result type of the host-call bodies.
pub(crate) type HostResult<T = ()> = Result<T, Fail>;

/// Turn a body's result into what wasmtime expects of an `i32`-returning import.
pub(crate) fn finish(r: HostResult) -> wasmtime::Result<i32> {
    match r {
        Ok(()) => Ok(Status::Ok.code()),
        Err(Fail::Status(s)) => Ok(s.code()),
        Err(Fail::Trap(e)) => Err(e),
    }
}

fn range(ptr: i32, len: i32, size: usize) -> Result<std::ops::Range<usize>, Status> {
    // Guest pointers are unsigned 32-bit offsets carried in i32 values.
    let start = ptr as u32 as usize;
    let len = len as u32 as usize;
    let end = start.checked_add(len).ok_or(Status::InvalidMemoryAccess)?;
    if end > size {
        return Err(Status::InvalidMemoryAccess);
    }
    Ok(start..end)
}

fn memory(caller: &Caller<'_, HostState>) -> Result<wasmtime::Memory, Status> {
    caller.data().memory.ok_or(Status::InvalidMemoryAccess)
}

/// Copy `len` bytes at `ptr` out of the guest.
pub(crate) fn read(caller: &Caller<'_, HostState>, ptr: i32, len: i32) -> Result<Vec<u8>, Status> {
    let mem = memory(caller)?;
    let data = mem.data(caller.as_context());
    let r = range(ptr, len, data.len())?;
    Ok(data[r].to_vec())
}

/// Copy `len` bytes at `ptr` out of the guest as a string (lossy on invalid UTF-8).
pub(crate) fn read_string(
    caller: &Caller<'_, HostState>,
    ptr: i32,
    len: i32,
) -> Result<String, Status> {
    let bytes = read(caller, ptr, len)?;
    Ok(match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

/// Write `bytes` at `ptr`.
pub(crate) fn write(caller: &mut Caller<'_, HostState>, ptr: i32, bytes: &[u8]) -> HostResult {
    let mem = memory(caller)?;
    let data = mem.data_mut(caller.as_context_mut());
    let len = i32::try_from(bytes.len()).map_err(|_| Status::InvalidMemoryAccess)?;
    let r = range(ptr, len, data.len())?;
    data[r].copy_from_slice(bytes);
    Ok(())
}

/// Write a little-endian u32 at `ptr`.
pub(crate) fn write_u32(caller: &mut Caller<'_, HostState>, ptr: i32, v: u32) -> HostResult {
    write(caller, ptr, &v.to_le_bytes())
}

/// Write a little-endian u64 at `ptr`.
pub(crate) fn write_u64(caller: &mut Caller<'_, HostState>, ptr: i32, v: u64) -> HostResult {
    write(caller, ptr, &v.to_le_bytes())
}

/// Check that `len` bytes at `ptr` are inside the guest memory, without reading them.
pub(crate) fn check(caller: &Caller<'_, HostState>, ptr: i32, len: i32) -> HostResult {
    let mem = memory(caller)?;
    range(ptr, len, mem.data_size(caller.as_context()))?;
    Ok(())
}

/// Allocate `data.len()` bytes with the guest's own allocator, copy `data` there, and store the
/// pointer and length at `ret_ptr`/`ret_len`. Empty data is returned as a null pointer and a
/// zero length, as the SDKs expect.
pub(crate) fn return_bytes(
    caller: &mut Caller<'_, HostState>,
    data: &[u8],
    ret_ptr: i32,
    ret_len: i32,
) -> HostResult {
    check(caller, ret_ptr, 4)?;
    check(caller, ret_len, 4)?;
    let ptr = if data.is_empty() {
        0
    } else {
        allocate(caller, data.len())?
    };
    // One look at the memory for the three writes (the allocator may have grown it).
    let mem = memory(caller)?;
    let memory = mem.data_mut(caller.as_context_mut());
    let len = data.len() as i32;
    let block = range(ptr, len, memory.len())?;
    let at_ptr = range(ret_ptr, 4, memory.len())?;
    let at_len = range(ret_len, 4, memory.len())?;
    memory[block].copy_from_slice(data);
    memory[at_ptr].copy_from_slice(&(ptr as u32).to_le_bytes());
    memory[at_len].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// Run `f` on `len` bytes at `ptr` of the guest's memory and the host state, without copying
/// the bytes out.
pub(crate) fn with_slice<R>(
    caller: &mut Caller<'_, HostState>,
    ptr: i32,
    len: i32,
    f: impl FnOnce(&[u8], &HostState) -> R,
) -> Result<R, Status> {
    let mem = memory(caller)?;
    let (data, state) = mem.data_and_store_mut(caller.as_context_mut());
    let r = range(ptr, len, data.len())?;
    Ok(f(&data[r], state))
}

/// Call the guest allocator (`proxy_on_memory_allocate`, else `malloc`) for `len` bytes and check
/// that the block it returns lies inside the memory.
pub(crate) fn allocate(caller: &mut Caller<'_, HostState>, len: usize) -> Result<i32, Fail> {
    let len_i32 = i32::try_from(len).map_err(|_| Status::InvalidMemoryAccess)?;
    let alloc = caller.data().alloc.clone().ok_or(Status::InternalFailure)?;
    let ptr = alloc.call(&mut *caller, len_i32).map_err(Fail::Trap)?;
    if ptr == 0 {
        return Err(Status::InvalidMemoryAccess.into());
    }
    check(caller, ptr, len_i32)?;
    Ok(ptr)
}
