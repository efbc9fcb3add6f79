//! The plugin configuration (JSON, from the plugin's YAML `config:`), checked into [`Settings`].

use serde::Deserialize;

/// Which side of the request this proxy reports as (Istio's `reporter` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporter {
    /// The proxy is the client side (an Istio ingress gateway or a sidecar's outbound).
    Source,
    /// The proxy is the server side (a sidecar's inbound).
    Destination,
}

impl Reporter {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// What is known about one side of the request. Every field is optional; an absent one is
/// reported as `unknown` (Istio fills these from peer metadata, which Weir does not exchange).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// `*_workload`. Default: `unknown`.
    pub workload: Option<String>,
    /// `*_workload_namespace` (and `destination_service_namespace`). Default: `unknown`.
    pub namespace: Option<String>,
    /// `*_principal` (a SPIFFE ID). Default: `unknown`, or for the source of a
    /// `reporter: destination` proxy the peer certificate's URI SAN under mutual TLS.
    pub principal: Option<String>,
    /// `*_app`. Default: `unknown`.
    pub app: Option<String>,
    /// `*_version`. Default: `unknown`.
    pub version: Option<String>,
    /// `*_canonical_service`. Default: `app`, else `workload`, else `unknown`.
    pub canonical_service: Option<String>,
    /// `*_canonical_revision`. Default: `version`, else `unknown`.
    pub canonical_revision: Option<String>,
    /// `*_cluster`. Default: `unknown`.
    pub cluster: Option<String>,
}

/// The checked configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The `reporter` label.
    pub reporter: Reporter,
    /// The client side.
    pub source: Workload,
    /// The server side.
    pub destination: Workload,
    /// Distinct label combinations kept per VM replica; later ones are folded into one series
    /// whose per-request labels are `other`.
    pub max_series: usize,
}

/// The configuration as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// `source` or `destination`. Default: `source`.
    reporter: Option<String>,
    /// The client side. Default: all unknown.
    #[serde(default)]
    source: Workload,
    /// The server side. Default: all unknown.
    #[serde(default)]
    destination: Workload,
    /// Default: 1000.
    max_series: Option<usize>,
}

/// Parse and check the plugin configuration (empty: all defaults). The message of an error
/// says what to fix.
pub fn parse(config: &[u8]) -> Result<Settings, String> {
    let raw: RawConfig = if config.iter().all(u8::is_ascii_whitespace) {
        RawConfig::default()
    } else {
        serde_json::from_slice(config).map_err(|e| format!("invalid configuration: {e}"))?
    };
    let reporter = match raw.reporter.as_deref() {
        None | Some("source") => Reporter::Source,
        Some("destination") => Reporter::Destination,
        Some(other) => {
            return Err(format!(
                "`reporter` `{other}`: expected `source` or `destination`"
            ));
        }
    };
    let max_series = raw.max_series.unwrap_or(1000);
    if max_series == 0 {
        return Err("`max_series` must be at least 1".into());
    }
    Ok(Settings {
        reporter,
        source: raw.source,
        destination: raw.destination,
        max_series,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_full_configuration() {
        let s = parse(b"").unwrap();
        assert_eq!(s.reporter, Reporter::Source);
        assert_eq!(s.source, Workload::default());
        assert_eq!(s.max_series, 1000);
        let s = parse(
            br#"{"reporter": "destination", "max_series": 5,
                 "source": {"workload": "edge", "namespace": "infra"},
                 "destination": {"app": "shop", "version": "v2", "cluster": "eu"}}"#,
        )
        .unwrap();
        assert_eq!(s.reporter, Reporter::Destination);
        assert_eq!(s.max_series, 5);
        assert_eq!(s.source.workload.as_deref(), Some("edge"));
        assert_eq!(s.destination.cluster.as_deref(), Some("eu"));
    }

    #[test]
    fn mistakes_are_explained() {
        for (config, needle) in [
            (&br#"{"reporter": "gateway"}"#[..], "`reporter` `gateway`"),
            (br#"{"max_series": 0}"#, "`max_series` must be at least 1"),
            (br#"{"source": {"pod": "x"}}"#, "unknown field `pod`"),
            (br#"{"labels": {}}"#, "unknown field `labels`"),
            (b"[1]", "invalid configuration"),
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
