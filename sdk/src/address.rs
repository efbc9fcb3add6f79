//! Addresses as proxy-wasm hosts give them (`source.address`, `:authority`).

/// The host or IP of `address` without its port: `10.0.0.7:4242` → `10.0.0.7`,
/// `[2001:db8::1]:443` → `2001:db8::1`, `shop.example:8080` → `shop.example`. A value without a
/// port (`shop.example`, a bare IPv6 address `2001:db8::1`) is returned unchanged.
pub fn without_port(address: &str) -> &str {
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match address.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => address,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_removed() {
        assert_eq!(without_port("10.0.0.7:4242"), "10.0.0.7");
        assert_eq!(without_port("[2001:db8::1]:443"), "2001:db8::1");
        assert_eq!(without_port("[::1]"), "::1");
        assert_eq!(without_port("2001:db8::1"), "2001:db8::1");
        assert_eq!(without_port("shop.example:8080"), "shop.example");
        assert_eq!(without_port("shop.example"), "shop.example");
        assert_eq!(without_port("unix:/tmp/sock"), "unix:/tmp/sock");
        assert_eq!(without_port(""), "");
    }
}
