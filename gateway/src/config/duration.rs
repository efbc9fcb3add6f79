//! Durations in the config file, written as `250ms`, `15s`, `1m 30s` (humantime syntax).

use std::fmt;

use serde::{Deserialize, Deserializer};

/// A duration read from the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duration(pub std::time::Duration);

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as `250ms`, `15s` or `1m`")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Duration, E> {
                humantime::parse_duration(v.trim())
                    .map(Duration)
                    .map_err(|e| E::custom(format!("invalid duration `{v}`: {e}")))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Duration, E> {
                if v == 0 {
                    Ok(Duration(std::time::Duration::ZERO))
                } else {
                    Err(E::custom(format!(
                        "a duration needs a unit: write `{v}s` or `{v}ms`"
                    )))
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// The value of an optional duration, or a default.
pub fn or(d: Option<Duration>, default: std::time::Duration) -> std::time::Duration {
    d.map(|d| d.0).unwrap_or(default)
}

impl schemars::JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A duration: a number and a unit, e.g. `250ms`, `15s`, `1m 30s`. `0` alone means zero.",
            "pattern": "^\\s*([0-9]+(\\.[0-9]+)?\\s*(ns|us|ms|s|sec|m|min|h|d)\\s*)+$|^0$"
        })
    }
}
