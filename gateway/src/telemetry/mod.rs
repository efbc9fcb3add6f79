//! Telemetry: access log and metrics.

pub mod access_log;
pub mod metrics;
