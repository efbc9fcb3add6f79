//! Header maps as the guest sees them: the wire encoding and the pseudo-header view of
//! request and response heads.

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};

use crate::stream::{RequestHead, ResponseHead};
use crate::types::Status;

/// A header name and value as raw bytes.
pub(crate) type Pair = (Vec<u8>, Vec<u8>);

/// Most pairs accepted in a map coming from the guest.
pub(crate) const MAX_PAIRS: usize = 1024;
/// Most bytes accepted in a serialized map coming from the guest.
pub(crate) const MAX_MAP_BYTES: usize = 1 << 20;

/// Serialize pairs: u32 count, count × (u32 key len, u32 value len), then each key and value
/// followed by a NUL byte; little-endian. An empty list serializes to nothing (a null map).
pub(crate) fn serialize<'a>(pairs: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> Vec<u8> {
    let pairs: Vec<(&[u8], &[u8])> = pairs.collect();
    let n = pairs.len();
    if n == 0 {
        return Vec::new();
    }
    let size = 4 + pairs
        .iter()
        .map(|(k, v)| 10 + k.len() + v.len())
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(n as u32).to_le_bytes());
    for (k, v) in &pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Parse a serialized map from the guest, checking every length against the buffer and the
/// limits (1,024 pairs, 1 MiB).
pub(crate) fn deserialize(bytes: &[u8]) -> Result<Vec<Pair>, Status> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    if bytes.len() > MAX_MAP_BYTES || bytes.len() < 4 {
        return Err(Status::BadArgument);
    }
    let n = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    if n > MAX_PAIRS {
        return Err(Status::BadArgument);
    }
    let mut p = 4usize
        .checked_add(n.checked_mul(8).ok_or(Status::BadArgument)?)
        .ok_or(Status::BadArgument)?;
    if p > bytes.len() {
        return Err(Status::BadArgument);
    }
    let mut out = Vec::with_capacity(n);
    let take = |p: &mut usize, len: usize| -> Result<Vec<u8>, Status> {
        let end = p.checked_add(len).ok_or(Status::BadArgument)?;
        let v = bytes.get(*p..end).ok_or(Status::BadArgument)?.to_vec();
        // The NUL terminator is expected but not required at the very end.
        *p = end + 1;
        Ok(v)
    };
    for i in 0..n {
        let s = 4 + i * 8;
        let kl = u32::from_le_bytes([bytes[s], bytes[s + 1], bytes[s + 2], bytes[s + 3]]) as usize;
        let vl =
            u32::from_le_bytes([bytes[s + 4], bytes[s + 5], bytes[s + 6], bytes[s + 7]]) as usize;
        let k = take(&mut p, kl)?;
        let v = take(&mut p, vl)?;
        out.push((k, v));
    }
    Ok(out)
}

/// Build a header name from guest bytes (lower-cased, as Envoy does).
pub(crate) fn name(key: &[u8]) -> Result<HeaderName, Status> {
    HeaderName::from_bytes(&key.to_ascii_lowercase()).map_err(|_| Status::BadArgument)
}

/// Build a header value from guest bytes (any bytes except CR, LF and NUL).
pub(crate) fn value(v: &[u8]) -> Result<HeaderValue, Status> {
    HeaderValue::from_bytes(v).map_err(|_| Status::BadArgument)
}

/// A header map the guest may read and, unless read-only, write.
///
/// The request and response heads are shared (a filter's view stays readable after the stream
/// moved on); a write copies one only when somebody else still holds it.
pub(crate) enum MapRef<'a> {
    Request(&'a mut Arc<RequestHead>),
    Response(&'a mut Arc<ResponseHead>),
    Plain(&'a mut HeaderMap),
    /// A read-only map with an optional `:status` (callout responses).
    ReadOnly(&'a HeaderMap, Option<StatusCode>),
}

fn get_plain<'m>(map: &'m HeaderMap, key: &[u8]) -> Option<&'m [u8]> {
    let lower = key.to_ascii_lowercase();
    let name = HeaderName::from_bytes(&lower).ok()?;
    map.get(name).map(|v| v.as_bytes())
}

impl MapRef<'_> {
    /// All pairs, pseudo-headers first.
    pub(crate) fn serialize(&self) -> Vec<u8> {
        match self {
            MapRef::Request(h) => {
                let pseudo = [
                    (&b":method"[..], h.method.as_str().as_bytes()),
                    (b":scheme", h.scheme.as_bytes()),
                    (b":authority", h.authority.as_bytes()),
                    (b":path", h.path.as_bytes()),
                ];
                serialize(
                    pseudo.into_iter().chain(
                        h.headers
                            .iter()
                            .map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes())),
                    ),
                )
            }
            MapRef::Response(h) => {
                let status = h.status.as_str().as_bytes();
                serialize(
                    std::iter::once((&b":status"[..], status)).chain(
                        h.headers
                            .iter()
                            .map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes())),
                    ),
                )
            }
            MapRef::Plain(m) => {
                serialize(m.iter().map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes())))
            }
            MapRef::ReadOnly(m, status) => {
                let s = status
                    .map(|s| s.as_str().as_bytes().to_vec())
                    .unwrap_or_default();
                let first = status.map(|_| (&b":status"[..], &s[..]));
                serialize(
                    first
                        .into_iter()
                        .chain(m.iter().map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes()))),
                )
            }
        }
    }

    /// Number of pairs.
    pub(crate) fn len(&self) -> usize {
        match self {
            MapRef::Request(h) => 4 + h.headers.len(),
            MapRef::Response(h) => 1 + h.headers.len(),
            MapRef::Plain(m) => m.len(),
            MapRef::ReadOnly(m, s) => m.len() + usize::from(s.is_some()),
        }
    }

    /// The first value of `key`.
    pub(crate) fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let key = self.alias(key);
        match self {
            MapRef::Request(h) => match key {
                b":method" => Some(h.method.as_str().as_bytes().to_vec()),
                b":scheme" => Some(h.scheme.as_bytes().to_vec()),
                b":authority" => Some(h.authority.as_bytes().to_vec()),
                b":path" => Some(h.path.as_bytes().to_vec()),
                _ => get_plain(&h.headers, key).map(<[u8]>::to_vec),
            },
            MapRef::Response(h) => match key {
                b":status" => Some(h.status.as_str().as_bytes().to_vec()),
                _ => get_plain(&h.headers, key).map(<[u8]>::to_vec),
            },
            MapRef::Plain(m) => get_plain(m, key).map(<[u8]>::to_vec),
            MapRef::ReadOnly(m, s) => match key {
                b":status" => s.map(|s| s.as_str().as_bytes().to_vec()),
                _ => get_plain(m, key).map(<[u8]>::to_vec),
            },
        }
    }

    /// In request headers `host` is `:authority`, as in Envoy (HTTP/1.1 `Host` is stored as
    /// `:authority`).
    fn alias<'k>(&self, key: &'k [u8]) -> &'k [u8] {
        if matches!(self, MapRef::Request(_)) && key.eq_ignore_ascii_case(b"host") {
            b":authority"
        } else {
            key
        }
    }

    fn set_pseudo(&mut self, key: &[u8], v: &[u8]) -> Result<bool, Status> {
        let key = self.alias(key);
        let text = || String::from_utf8(v.to_vec()).map_err(|_| Status::BadArgument);
        match self {
            MapRef::Request(h) => match key {
                b":method" => {
                    Arc::make_mut(h).method =
                        http::Method::from_bytes(v).map_err(|_| Status::BadArgument)?
                }
                b":scheme" => Arc::make_mut(h).scheme = text()?.into(),
                b":authority" => Arc::make_mut(h).authority = text()?,
                b":path" => Arc::make_mut(h).path = text()?,
                _ if key.starts_with(b":") => return Err(Status::BadArgument),
                _ => return Ok(false),
            },
            MapRef::Response(h) => match key {
                b":status" => {
                    let code: u16 = std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                        .ok_or(Status::BadArgument)?;
                    Arc::make_mut(h).status =
                        StatusCode::from_u16(code).map_err(|_| Status::BadArgument)?;
                }
                _ if key.starts_with(b":") => return Err(Status::BadArgument),
                _ => return Ok(false),
            },
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn plain_mut(&mut self) -> Result<&mut HeaderMap, Status> {
        match self {
            MapRef::Request(h) => Ok(&mut Arc::make_mut(h).headers),
            MapRef::Response(h) => Ok(&mut Arc::make_mut(h).headers),
            MapRef::Plain(m) => Ok(m),
            MapRef::ReadOnly(..) => Err(Status::BadArgument),
        }
    }

    /// Append a value (pseudo-headers are set).
    pub(crate) fn add(&mut self, key: &[u8], v: &[u8]) -> Result<(), Status> {
        if self.set_pseudo(key, v)? {
            return Ok(());
        }
        let (n, v) = (name(key)?, value(v)?);
        self.plain_mut()?.append(n, v);
        Ok(())
    }

    /// Replace all values of `key` with one (adds it when absent).
    pub(crate) fn replace(&mut self, key: &[u8], v: &[u8]) -> Result<(), Status> {
        if self.set_pseudo(key, v)? {
            return Ok(());
        }
        let (n, v) = (name(key)?, value(v)?);
        self.plain_mut()?.insert(n, v);
        Ok(())
    }

    /// Remove all values of `key` (a pseudo-header becomes empty; `:status`, `:method` are kept).
    pub(crate) fn remove(&mut self, key: &[u8]) -> Result<(), Status> {
        let key = self.alias(key);
        if key.starts_with(b":") {
            return match self {
                MapRef::Request(h) => {
                    match key {
                        b":scheme" => Arc::make_mut(h).scheme = "".into(),
                        b":authority" => Arc::make_mut(h).authority.clear(),
                        b":path" => Arc::make_mut(h).path.clear(),
                        _ => {}
                    }
                    Ok(())
                }
                MapRef::ReadOnly(..) => Err(Status::BadArgument),
                _ => Ok(()),
            };
        }
        let map = self.plain_mut()?;
        if let Ok(n) = name(key) {
            map.remove(n);
        }
        Ok(())
    }

    /// Replace the whole map with `pairs` (pseudo-headers in it are set, others kept).
    pub(crate) fn set_all(&mut self, pairs: &[(Vec<u8>, Vec<u8>)]) -> Result<(), Status> {
        // Validate everything first so that a bad pair leaves the map untouched.
        let mut plain = HeaderMap::with_capacity(pairs.len());
        for (k, v) in pairs {
            if self.alias(k).starts_with(b":") {
                continue;
            }
            plain.append(name(k)?, value(v)?);
        }
        for (k, v) in pairs {
            if self.alias(k).starts_with(b":") {
                self.set_pseudo(k, v)?;
            }
        }
        *self.plain_mut()? = plain;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let pairs = [(&b"a"[..], &b"1"[..]), (b"bb", b"")];
        let s = serialize(pairs.into_iter());
        let back = deserialize(&s).unwrap();
        assert_eq!(
            back,
            vec![(b"a".to_vec(), b"1".to_vec()), (b"bb".to_vec(), vec![])]
        );
        assert!(serialize(std::iter::empty()).is_empty());
    }

    #[test]
    fn rejects_bad_lengths() {
        let mut s = serialize([(&b"a"[..], &b"1"[..])].into_iter());
        s[4] = 200;
        assert_eq!(deserialize(&s), Err(Status::BadArgument));
        assert_eq!(deserialize(&[1, 0]), Err(Status::BadArgument));
        assert_eq!(
            deserialize(&[0xff, 0xff, 0xff, 0xff]),
            Err(Status::BadArgument)
        );
    }

    #[test]
    fn pseudo_headers() {
        let mut head = Arc::new(RequestHead::default());
        let shared = head.clone();
        let mut m = MapRef::Request(&mut head);
        m.replace(b":path", b"/x").unwrap();
        m.add(b"X-Foo", b"\xffbar").unwrap();
        m.replace(b"Host", b"h.example").unwrap();
        assert_eq!(m.get(b":authority").unwrap(), b"h.example");
        assert_eq!(m.get(b"host").unwrap(), b"h.example");
        assert_eq!(m.get(b":path").unwrap(), b"/x");
        assert_eq!(m.get(b"x-foo").unwrap(), b"\xffbar");
        assert_eq!(m.len(), 5);
        assert_eq!(m.add(b":bogus", b"1"), Err(Status::BadArgument));
        // The other holder keeps the head as it was.
        assert_eq!(shared.path, "/");
    }

    #[test]
    fn random_input_never_panics() {
        use rand::{Rng, RngCore};
        let mut rng = rand::rng();
        for _ in 0..20_000 {
            let len = rng.random_range(0..64);
            let mut bytes = vec![0u8; len];
            rng.fill_bytes(&mut bytes);
            if len >= 4 && rng.random_bool(0.5) {
                // Plausible counts exercise the length checks.
                bytes[..4].copy_from_slice(&rng.random_range(0u32..6).to_le_bytes());
            }
            if let Ok(pairs) = deserialize(&bytes) {
                let again = serialize(pairs.iter().map(|(k, v)| (&k[..], &v[..])));
                assert_eq!(deserialize(&again).unwrap(), pairs);
            }
        }
    }
}
