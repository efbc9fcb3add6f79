//! The plugin configuration (JSON, from the plugin's YAML `config:`), checked into [`Settings`].

use serde::Deserialize;

use crate::bucket::Quota;

/// What a request's bucket is chosen by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// One bucket for all requests.
    Global,
    /// The value of this request header (lower case); requests without it share one bucket.
    Header(String),
    /// The client's IP address (`source.address` without the port).
    RemoteAddress,
    /// The request path without the query string.
    Path,
}

/// The checked configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The token bucket.
    pub quota: Quota,
    /// How requests are assigned to buckets.
    pub key: KeySource,
    /// Status of the local reply when limited.
    pub status: u32,
    /// Whether to add `x-ratelimit-limit`, `x-ratelimit-remaining` and `x-ratelimit-reset`.
    pub headers: bool,
}

/// The configuration as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Tokens added per `per`. Required, at least 1.
    requests: u32,
    /// The fill interval (`1s`, `500ms`, `1m`). Default: `1s`.
    per: Option<String>,
    /// Bucket size. Default: `requests`.
    burst: Option<u32>,
    /// The bucket key. Default: one bucket.
    key: Option<RawKey>,
    /// Status of the local reply. Default: 429.
    status: Option<u32>,
    /// Add the `x-ratelimit-*` headers. Default: false (as Envoy's
    /// `enable_x_ratelimit_headers: OFF`).
    headers: Option<bool>,
}

/// `key:`: exactly one of the fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    /// A request header's name.
    header: Option<String>,
    /// `true`: the client's IP address.
    #[serde(default)]
    remote_address: bool,
    /// `true`: the request path (without the query).
    #[serde(default)]
    path: bool,
}

/// Parse and check the plugin configuration. The message of an error says what to fix.
pub fn parse(config: &[u8]) -> Result<Settings, String> {
    if config.iter().all(u8::is_ascii_whitespace) {
        return Err("the configuration is empty: `requests` is required".into());
    }
    let raw: RawConfig =
        serde_json::from_slice(config).map_err(|e| format!("invalid configuration: {e}"))?;
    if raw.requests == 0 {
        return Err("`requests` must be at least 1".into());
    }
    let per = match raw.per.as_deref() {
        None => std::time::Duration::from_secs(1),
        Some(p) => humantime::parse_duration(p.trim())
            .map_err(|e| format!("`per`: invalid duration `{p}`: {e}"))?,
    };
    let per_ns = u64::try_from(per.as_nanos()).map_err(|_| "`per` is too long".to_string())?;
    if per_ns == 0 {
        return Err("`per` must be longer than zero".into());
    }
    let burst = raw.burst.unwrap_or(raw.requests);
    if burst == 0 {
        return Err("`burst` must be at least 1".into());
    }
    let key = match raw.key {
        None => KeySource::Global,
        Some(k) => {
            let header = k.header.as_deref().map(|h| h.trim().to_ascii_lowercase());
            match (header, k.remote_address, k.path) {
                (Some(h), false, false) if !h.is_empty() => KeySource::Header(h),
                (Some(_), false, false) => return Err("`key.header` is empty".into()),
                (None, true, false) => KeySource::RemoteAddress,
                (None, false, true) => KeySource::Path,
                _ => {
                    return Err(
                        "`key` needs exactly one of `header: NAME`, `remote_address: true`, `path: true`"
                            .into(),
                    );
                }
            }
        }
    };
    let status = raw.status.unwrap_or(429);
    if !(200..=599).contains(&status) {
        return Err(format!("`status` {status}: expected 200 to 599"));
    }
    Ok(Settings {
        quota: Quota {
            requests: raw.requests,
            per_ns,
            burst,
        },
        key,
        status,
        headers: raw.headers.unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_and_minimal_configurations() {
        let s = parse(
            br#"{"requests": 100, "per": "500ms", "burst": 20, "key": {"header": "X-Api-Key"},
                 "status": 503, "headers": true}"#,
        )
        .unwrap();
        assert_eq!(
            s,
            Settings {
                quota: Quota {
                    requests: 100,
                    per_ns: 500_000_000,
                    burst: 20
                },
                key: KeySource::Header("x-api-key".into()),
                status: 503,
                headers: true,
            }
        );
        let s = parse(br#"{"requests": 5}"#).unwrap();
        assert_eq!(
            s.quota,
            Quota {
                requests: 5,
                per_ns: 1_000_000_000,
                burst: 5
            },
            "per defaults to 1s and burst to requests"
        );
        assert_eq!(
            (s.key, s.status, s.headers),
            (KeySource::Global, 429, false)
        );
        let minute = parse(br#"{"requests": 1, "per": "1m", "key": {"path": true}}"#).unwrap();
        assert_eq!(minute.quota.per_ns, 60_000_000_000);
        assert_eq!(minute.key, KeySource::Path);
        let ip = parse(br#"{"requests": 1, "key": {"remote_address": true}}"#).unwrap();
        assert_eq!(ip.key, KeySource::RemoteAddress);
    }

    #[test]
    fn mistakes_are_explained() {
        for (config, needle) in [
            (&b""[..], "`requests` is required"),
            (b"{}", "missing field `requests`"),
            (b"not json", "invalid configuration"),
            (br#"{"requests": 0}"#, "`requests` must be at least 1"),
            (
                br#"{"requests": 1, "per": "soon"}"#,
                "`per`: invalid duration `soon`",
            ),
            (
                br#"{"requests": 1, "per": "0s"}"#,
                "`per` must be longer than zero",
            ),
            (
                br#"{"requests": 1, "burst": 0}"#,
                "`burst` must be at least 1",
            ),
            (br#"{"requests": 1, "key": {}}"#, "exactly one of"),
            (
                br#"{"requests": 1, "key": {"header": "a", "path": true}}"#,
                "exactly one of",
            ),
            (
                br#"{"requests": 1, "key": {"header": " "}}"#,
                "`key.header` is empty",
            ),
            (
                br#"{"requests": 1, "key": {"cookie": "a"}}"#,
                "unknown field `cookie`",
            ),
            (br#"{"requests": 1, "status": 99}"#, "`status` 99"),
            (br#"{"requests": 1, "limit": 3}"#, "unknown field `limit`"),
        ] {
            let e = parse(config).unwrap_err();
            assert!(
                e.contains(needle),
                "{}: {e}",
                String::from_utf8_lossy(config)
            );
        }
    }
}
