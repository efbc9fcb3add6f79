//! Several properties in one host call: Weir's `weir_get_properties` foreign function, with
//! `proxy_get_property` as the portable fallback (Envoy and Istio answer `NOT_FOUND` to the
//! foreign function, and the filter then reads each property on its own, as it would anyway).
//!
//! ```ignore
//! static WANTED: LazyLock<PropertyBatch> =
//!     LazyLock::new(|| PropertyBatch::new(&[&["request", "host"], &["response", "code"]]));
//! let values = WANTED.fetch();
//! let host = values.get(0);
//! ```

use std::cell::Cell;

use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

/// The foreign function's name (Weir's `GET_PROPERTIES_FUNCTION`).
pub const GET_PROPERTIES_FUNCTION: &str = "weir_get_properties";

thread_local! {
    /// Whether the host serves the foreign function: unknown until the first call.
    static FAST_PATH: Cell<Option<bool>> = const { Cell::new(None) };
}

/// A fixed list of property paths, encoded once, fetched together as often as needed.
#[derive(Debug, Clone)]
pub struct PropertyBatch {
    paths: Vec<Vec<String>>,
    args: Vec<u8>,
}

/// The values of one [`PropertyBatch::fetch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PropertyValues {
    /// The foreign function's answer, read in place.
    Batch(Vec<u8>),
    /// One `proxy_get_property` per path.
    EachAlone(Vec<Option<Vec<u8>>>),
}

impl PropertyBatch {
    /// A batch of `paths` (each a property path such as `["request", "host"]`).
    pub fn new(paths: &[&[&str]]) -> PropertyBatch {
        PropertyBatch {
            paths: paths
                .iter()
                .map(|p| p.iter().map(|s| s.to_string()).collect())
                .collect(),
            args: encode(paths),
        }
    }

    /// The values now, in one host call where the host serves it.
    pub fn fetch(&self) -> PropertyValues {
        if FAST_PATH.get() != Some(false) {
            match hostcalls::call_foreign_function(GET_PROPERTIES_FUNCTION, Some(&self.args)) {
                Ok(Some(raw)) if well_formed(self.paths.len(), &raw) => {
                    FAST_PATH.set(Some(true));
                    return PropertyValues::Batch(raw);
                }
                Err(Status::NotFound) => FAST_PATH.set(Some(false)),
                _ => {}
            }
        }
        PropertyValues::EachAlone(
            self.paths
                .iter()
                .map(|p| {
                    let path: Vec<&str> = p.iter().map(String::as_str).collect();
                    hostcalls::get_property(path).ok().flatten()
                })
                .collect(),
        )
    }
}

impl PropertyValues {
    /// The value of the `i`-th path; `None` if the host does not have it.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        match self {
            PropertyValues::Batch(raw) => value_at(raw, i),
            PropertyValues::EachAlone(values) => values.get(i)?.as_deref(),
        }
    }
}

/// The foreign function's arguments: a little-endian `u32` count, the lengths, then the paths
/// (segments separated by NUL).
pub fn encode(paths: &[&[&str]]) -> Vec<u8> {
    let joined: Vec<String> = paths.iter().map(|p| p.join("\0")).collect();
    let size = 4 + 4 * paths.len() + joined.iter().map(String::len).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(paths.len() as u32).to_le_bytes());
    for p in &joined {
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
    }
    for p in &joined {
        out.extend_from_slice(p.as_bytes());
    }
    out
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// The `i`-th value of a result (see [`well_formed`]).
fn value_at(raw: &[u8], i: usize) -> Option<&[u8]> {
    let n = u32_at(raw, 0)? as usize;
    if i >= n {
        return None;
    }
    let mut at = 4 + 4 * n;
    for k in 0..i {
        let len = u32_at(raw, 4 + 4 * k)?;
        if len != u32::MAX {
            at += len as usize;
        }
    }
    let len = u32_at(raw, 4 + 4 * i)?;
    if len == u32::MAX {
        return None;
    }
    raw.get(at..at + len as usize)
}

/// Whether `bytes` is a well-formed result for `n` paths: a little-endian `u32` count `n`, `n`
/// lengths (`u32::MAX` for a property that does not exist), then exactly the values.
pub fn well_formed(n: usize, bytes: &[u8]) -> bool {
    let check = || -> Option<bool> {
        if u32_at(bytes, 0)? as usize != n {
            return Some(false);
        }
        let mut at = 4usize.checked_add(n.checked_mul(4)?)?;
        for i in 0..n {
            let len = u32_at(bytes, 4 + 4 * i)?;
            if len != u32::MAX {
                at = at.checked_add(len as usize)?;
            }
        }
        Some(at == bytes.len())
    };
    check().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::{PropertyValues, encode, well_formed};

    #[test]
    fn paths_are_counted_sized_and_joined_by_nul() {
        let e = encode(&[&["request", "host"], &["xds", "cluster_name"]]);
        let mut want = vec![2, 0, 0, 0, 12, 0, 0, 0, 16, 0, 0, 0];
        want.extend_from_slice(b"request\0hostxds\0cluster_name");
        assert_eq!(e, want);
    }

    fn result() -> Vec<u8> {
        let mut r = vec![3, 0, 0, 0, 2, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 3, 0, 0, 0];
        r.extend_from_slice(b"okyes");
        r
    }

    #[test]
    fn malformed_results_are_refused() {
        let r = result();
        assert!(well_formed(3, &r));
        assert!(!well_formed(2, &r), "another count");
        assert!(!well_formed(3, &r[..r.len() - 1]), "a value cut short");
        let mut longer = r.clone();
        longer.push(0);
        assert!(!well_formed(3, &longer), "bytes left over");
        assert!(!well_formed(1, &[1, 0]), "no room for the count");
    }

    #[test]
    fn values_are_read_in_place_or_one_by_one() {
        let batch = PropertyValues::Batch(result());
        let alone =
            PropertyValues::EachAlone(vec![Some(b"ok".to_vec()), None, Some(b"yes".to_vec())]);
        for v in [batch, alone] {
            assert_eq!(v.get(0), Some(&b"ok"[..]));
            assert_eq!(v.get(1), None);
            assert_eq!(v.get(2), Some(&b"yes"[..]));
            assert_eq!(v.get(3), None);
        }
    }
}
