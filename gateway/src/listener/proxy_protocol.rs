//! The PROXY protocol (v1 text and v2 binary), sent by load balancers before the client's bytes
//! to carry the client's address. Read exactly, byte for byte, so nothing of the stream is lost.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// Why a PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    /// Not a PROXY header.
    #[error("connection did not start with a PROXY protocol header")]
    Missing,
    /// Malformed header.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    /// I/O error while reading.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

const V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

/// Read a PROXY header from `io`. Returns the client address it carries, or `None` for
/// `UNKNOWN`/`LOCAL` (health checks from the load balancer itself).
pub async fn read_header<R: AsyncRead + Unpin>(
    io: &mut R,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut start = [0u8; 5];
    io.read_exact(&mut start).await?;
    if &start == b"PROXY" {
        return read_v1(io).await;
    }
    if start == V2_SIGNATURE[..5] {
        return read_v2(io).await;
    }
    Err(ProxyHeaderError::Missing)
}

async fn read_v1<R: AsyncRead + Unpin>(io: &mut R) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    // The whole line is at most 107 bytes; 5 are read.
    let mut line = Vec::with_capacity(102);
    loop {
        let b = io.read_u8().await?;
        line.push(b);
        if line.ends_with(b"\r\n") {
            break;
        }
        if line.len() > 102 {
            return Err(ProxyHeaderError::Malformed("v1 line too long"));
        }
    }
    let text = std::str::from_utf8(&line[..line.len() - 2])
        .map_err(|_| ProxyHeaderError::Malformed("not ASCII"))?;
    parse_v1(text)
}

/// Parse the part of a v1 line after `PROXY`.
pub fn parse_v1(text: &str) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut parts = text.split(' ');
    if parts.next() != Some("") {
        return Err(ProxyHeaderError::Malformed("missing space after PROXY"));
    }
    let proto = parts
        .next()
        .ok_or(ProxyHeaderError::Malformed("missing protocol"))?;
    if proto == "UNKNOWN" {
        return Ok(None);
    }
    let src: IpAddr = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(ProxyHeaderError::Malformed("bad source address"))?;
    let dst: IpAddr = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(ProxyHeaderError::Malformed("bad destination address"))?;
    let sport: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(ProxyHeaderError::Malformed("bad source port"))?;
    let _dport: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(ProxyHeaderError::Malformed("bad destination port"))?;
    if parts.next().is_some() {
        return Err(ProxyHeaderError::Malformed("trailing fields"));
    }
    match (proto, src, dst) {
        ("TCP4", IpAddr::V4(_), IpAddr::V4(_)) | ("TCP6", IpAddr::V6(_), IpAddr::V6(_)) => {
            Ok(Some(SocketAddr::new(src, sport)))
        }
        _ => Err(ProxyHeaderError::Malformed(
            "protocol does not match address family",
        )),
    }
}

async fn read_v2<R: AsyncRead + Unpin>(io: &mut R) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut rest = [0u8; 11];
    io.read_exact(&mut rest).await?;
    if rest[..7] != V2_SIGNATURE[5..] {
        return Err(ProxyHeaderError::Missing);
    }
    let ver_cmd = rest[7];
    let family = rest[8];
    let len = u16::from_be_bytes([rest[9], rest[10]]) as usize;
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    parse_v2(ver_cmd, family, &body)
}

/// Parse a v2 header's fields after the signature.
pub fn parse_v2(
    ver_cmd: u8,
    family: u8,
    body: &[u8],
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    if ver_cmd >> 4 != 2 {
        return Err(ProxyHeaderError::Malformed("unsupported version"));
    }
    match ver_cmd & 0x0F {
        0 => return Ok(None), // LOCAL
        1 => {}
        _ => return Err(ProxyHeaderError::Malformed("unknown command")),
    }
    match family >> 4 {
        1 => {
            if body.len() < 12 {
                return Err(ProxyHeaderError::Malformed("short IPv4 addresses"));
            }
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            let port = u16::from_be_bytes([body[8], body[9]]);
            Ok(Some(SocketAddr::new(ip.into(), port)))
        }
        2 => {
            if body.len() < 36 {
                return Err(ProxyHeaderError::Malformed("short IPv6 addresses"));
            }
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            let port = u16::from_be_bytes([body[32], body[33]]);
            Ok(Some(SocketAddr::new(Ipv6Addr::from(octets).into(), port)))
        }
        _ => Ok(None), // UNSPEC or UNIX: keep the peer address
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn v1_reads_exactly_the_header() {
        let mut data: &[u8] = b"PROXY TCP4 192.0.2.1 198.51.100.2 51234 443\r\nGET / HTTP/1.1\r\n";
        let addr = read_header(&mut data).await.unwrap();
        assert_eq!(addr, Some("192.0.2.1:51234".parse().unwrap()));
        assert_eq!(data, b"GET / HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn v2_ipv4_and_local() {
        let mut hdr = V2_SIGNATURE.to_vec();
        hdr.extend_from_slice(&[
            0x21, 0x11, 0, 12, 203, 0, 113, 7, 10, 0, 0, 1, 0x1F, 0x90, 0x01, 0xBB,
        ]);
        hdr.extend_from_slice(b"rest");
        let mut data: &[u8] = &hdr;
        assert_eq!(
            read_header(&mut data).await.unwrap(),
            Some("203.0.113.7:8080".parse().unwrap())
        );
        assert_eq!(data, b"rest");
        assert!(parse_v2(0x20, 0x11, &[]).unwrap().is_none());
    }

    #[tokio::test]
    async fn rejects_garbage() {
        let mut data: &[u8] = b"GET / HTTP/1.1\r\n";
        assert!(matches!(
            read_header(&mut data).await,
            Err(ProxyHeaderError::Missing)
        ));
        assert!(parse_v1(" TCP4 1.2.3.4 ::1 1 2").is_err());
        assert!(parse_v1(" TCP4 1.2.3.4 5.6.7.8 1").is_err());
        assert_eq!(parse_v1(" UNKNOWN").unwrap(), None);
    }
}
